"""The JSON bodies OpenAI's API answers with, for chat (`chat.completion`, deltas in `chat.completion.chunk`)
and text completions (`text_completion`), whole and as server-sent-event chunks."""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from ..generate import Reply
from .schema import ChatRequest, CompletionRequest


@dataclass(frozen=True)
class Endpoint:
    """What differs between /v1/chat/completions and /v1/completions."""

    request: type[ChatRequest] | type[CompletionRequest]
    object: str
    chunk_object: str
    id_prefix: str

    @property
    def chat(self) -> bool:
        return self.request is ChatRequest

    def choice(self, text: str, finish_reason: str | None) -> dict:
        body = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
        return {"index": 0, **body, "logprobs": None, "finish_reason": finish_reason}

    def delta(self, text: str, finish_reason: str | None = None, first: bool = False) -> dict:
        """A streamed choice: chat's first delta names the role; the last one carries only finish_reason."""
        if not self.chat:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


CHAT = Endpoint(ChatRequest, "chat.completion", "chat.completion.chunk", "chatcmpl-")
COMPLETION = Endpoint(CompletionRequest, "text_completion", "text_completion", "cmpl-")


def usage(reply: Reply) -> dict:
    return {"prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens}


@dataclass
class Answer:
    """One request's answer: its id and creation time, shared by every chunk of a stream."""

    endpoint: Endpoint
    model: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    def _envelope(self, obj: str) -> dict:
        return {"id": self.endpoint.id_prefix + self.id, "object": obj, "created": self.created,
                "model": self.model}

    def whole(self, text: str, reply: Reply) -> dict:
        return {**self._envelope(self.endpoint.object), "choices": [self.endpoint.choice(text, reply.finish_reason)],
                "usage": usage(reply)}

    def chunk(self, choices: list[dict], reply: Reply | None = None) -> str:
        """One server-sent event; `reply` adds the usage (stream_options.include_usage)."""
        body = {**self._envelope(self.endpoint.chunk_object), "choices": choices}
        if reply is not None:
            body["usage"] = usage(reply)
        return event(body)


def event(body: dict | str) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"
