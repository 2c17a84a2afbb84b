"""The request bodies of /v1/chat/completions and /v1/completions, checked with pydantic: fields we do not
know are ignored (clients send many), fields we know but that are invalid, or ask for what we cannot do
(n > 1, logprobs), are an APIError (400) naming the field, as OpenAI's API answers."""
from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import APIError

MAX_STOPS = 4  # as OpenAI's API


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def as_dict(self) -> dict[str, str]:
        """The {"role", "content"} form chat templates read; text parts joined."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": self.role, "content": content}


class _Request(BaseModel):
    """Fields both endpoints share. `top_k`, `repetition_penalty` and `ignore_eos` are extensions (as vLLM's)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    seed: int | None = Field(None, ge=-(1 << 63), lt=1 << 64)
    stop: str | list[str] = []
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    logprobs: Literal[False] = False
    ignore_eos: bool = False

    @model_validator(mode="before")
    @classmethod
    def _nulls(cls, data: Any) -> Any:
        """null is "not given", as clients send it for options they leave unset."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str]) -> list[str]:
        stops = [stop] if isinstance(stop, str) else stop
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences")
        return [s for s in stops if s]

    def requested_tokens(self) -> tuple[str, int | None]:
        """The field that bounds the reply's tokens, and its value (None: not given)."""
        return "max_tokens", self.max_tokens

    def options(self, max_tokens: int) -> dict[str, Any]:
        """Keyword arguments of MoEModel.generate; `max_tokens` when the request gives none."""
        requested = self.requested_tokens()[1]
        return dict(max_new_tokens=max_tokens if requested is None else requested,
                    temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                    repetition_penalty=self.repetition_penalty, seed=self.seed, stop=self.stop,
                    **({"eos_token_ids": []} if self.ignore_eos else {}))

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)

    def prompt(self) -> list[dict[str, str]]:
        return [m.as_dict() for m in self.messages]

    def requested_tokens(self) -> tuple[str, int | None]:
        if self.max_completion_tokens is not None:  # the newer name of max_tokens in chat
            return "max_completion_tokens", self.max_completion_tokens
        return super().requested_tokens()


class CompletionRequest(_Request):
    prompt_: str | list[str] = Field(alias="prompt")
    echo: Literal[False] = False
    suffix: None = None

    def prompt(self) -> str:
        if isinstance(self.prompt_, str):
            return self.prompt_
        if len(self.prompt_) != 1:
            raise APIError(400, "only one prompt per request is supported", param="prompt")
        return self.prompt_[0]


def parse(body: bytes, kind: type[_Request], max_tokens: int) -> _Request:
    """The request, or an APIError (400) for a body that is not a JSON object, an invalid field, or a
    max_tokens above the server's bound."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        request = kind.model_validate_json(body)
    except ValidationError as e:
        error = e.errors()[0]
        field = ".".join(str(part) for part in error["loc"] if not _type_tag(part))
        raise APIError(400, f"{field}: {error['msg']}", param=field) from None
    name, value = request.requested_tokens()
    if value is not None and value > max_tokens:
        raise APIError(400, f"{name} is {value}, more than this server allows ({max_tokens}; offload-serve "
                       "--max-tokens raises it)", param=name)
    return request


def _type_tag(part: str | int) -> bool:
    """pydantic names the member of a union that failed ('str', 'list[str]') among the field names of an
    error's location; OpenAI's `param` has field names only."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "list", "dict") or "[" in part)
