"""Decoding: sampling rules, the token loop over a preallocated KV cache, and incremental text streaming."""
from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .model.decoder import Decoder


@dataclass(frozen=True)
class Sampling:
    """temperature 0 means greedy; top_k 0 and top_p 1 disable those filters."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        checks = [(self.temperature >= 0, "temperature must be >= 0"),
                  (0 < self.top_p <= 1, "top_p must be in (0, 1]"), (self.top_k >= 0, "top_k must be >= 0"),
                  (self.repetition_penalty > 0, "repetition_penalty must be > 0")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def warp(logits: torch.Tensor, history: torch.Tensor, s: Sampling) -> torch.Tensor:
    """Repetition penalty, then (when sampling) temperature, top-k and top-p, with transformers' semantics.
    logits [B, V] fp32; filtered tokens get -inf."""
    logits = logits.float()
    if s.repetition_penalty != 1.0:
        seen = logits.gather(1, history)
        logits = logits.scatter(1, history, torch.where(seen < 0, seen * s.repetition_penalty,
                                                        seen / s.repetition_penalty))
    if s.temperature == 0:
        return logits
    logits = logits / s.temperature
    if s.top_k:
        kth = torch.topk(logits, min(s.top_k, logits.shape[-1]), dim=-1)[0][..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= s.top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, history: torch.Tensor, s: Sampling,
                generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]: argmax when greedy, else a draw from the warped distribution."""
    logits = warp(logits, history, s)
    if s.temperature == 0:
        return logits.argmax(dim=-1)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)


def check_mask(mask: torch.Tensor | None, ids: torch.Tensor, left_padded: bool) -> torch.Tensor:
    """The attention mask as bool [B, T] (all true when None), or a one-line ValueError: the shape of input_ids,
    only 0 and 1, a token in every row, and for generation padding only on the left (a right-padded row would
    continue from its padding, and its output would be wrong)."""
    if mask is None:
        return torch.ones_like(ids, dtype=torch.bool)
    shapes = (tuple(ids.shape), tuple(ids.shape[1:]) if ids.shape[0] == 1 else None)  # [1, T] ids: a [T] mask
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) not in shapes:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"attention_mask has shape {shape} but input_ids {tuple(ids.shape)}; give one 0/1 entry "
                         "per token")
    mask = mask.reshape(ids.shape).to(ids.device)
    if not ((mask == 0) | (mask == 1)).all():
        raise ValueError("attention_mask must hold only 0 and 1 (1 = token, 0 = padding)")
    valid = mask.bool()
    if not valid.any(1).all():
        raise ValueError(f"attention_mask row {int((~valid.any(1)).nonzero()[0])} has no tokens; drop that row")
    right = valid[:, :-1] & ~valid[:, 1:]
    if left_padded and right.any():
        raise ValueError(f"attention_mask row {int(right.any(1).nonzero()[0])} has padding after a token; generate "
                         "continues every row from its last position: pad on the left (tokenizer.padding_side = "
                         "'left')")
    return valid


def context_budget(prompt_tokens: int, max_new_tokens: int, limit: int) -> int:
    """How many tokens may follow the prompt within the model's context (max_position_embeddings): a longer
    prompt is refused; generation is capped there (`stop_at_context` says so when it happens)."""
    if prompt_tokens > limit:
        raise ValueError(f"the prompt has {prompt_tokens} tokens, more than the model's context of {limit} "
                         "(max_position_embeddings); shorten it")
    return min(max_new_tokens, limit - prompt_tokens)


def stop_at_context(tokens: Iterator[torch.Tensor], budget: int, requested: int, limit: int,
                    eos_ids: Sequence[int]) -> Iterator[torch.Tensor]:
    """Pass the tokens on; when the context limit, not EOS or max_new_tokens, ended generation, warn."""
    produced, finished = 0, None
    for token in tokens:
        produced += 1
        ended = torch.isin(token, torch.tensor(list(eos_ids), dtype=token.dtype, device=token.device))
        finished = ended if finished is None else finished | ended
        yield token
    if budget < requested and produced == budget and not (finished is not None and bool(finished.all())):
        warnings.warn(f"generation stopped at the model's context limit of {limit} tokens "
                      "(max_position_embeddings), before max_new_tokens", stacklevel=2)


def token_loop(decoder: Decoder, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               max_new_tokens: int, sampling: Sampling, eos_ids: Sequence[int]) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, step by step; stops when every row has produced an EOS."""
    B, T = input_ids.shape
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    cache = decoder.decode_cache(B, T + max_new_tokens)
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=decoder.device).manual_seed(sampling.seed)
    history = input_ids
    eos = torch.tensor(list(eos_ids), dtype=torch.long, device=input_ids.device)
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    tokens = input_ids
    step_valid = valid
    for hook in decoder.hooks:
        hook.begin(B)
    try:
        for _ in range(max_new_tokens):
            token = next_tokens(decoder.next_logits(tokens, cache, positions, step_valid), history, sampling,
                                generator)
            yield token
            finished |= torch.isin(token, eos)
            if bool(finished.all()):
                return
            history = torch.cat((history, token[:, None]), 1)
            tokens = token[:, None]
            positions = positions[:, -1:] + 1
            step_valid = torch.ones(B, 1, dtype=torch.bool, device=input_ids.device)
    finally:
        decoder.release(cache)
        for hook in decoder.hooks:
            hook.end()


def collect_ids(input_ids: torch.Tensor, tokens: Iterator[torch.Tensor], eos_ids: Sequence[int],
                pad_id: int) -> torch.Tensor:
    """[B, T] + yielded tokens -> [B, T + n]; rows that finished early are padded with `pad_id` after EOS."""
    out, done = [], torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    eos = torch.tensor(list(eos_ids), dtype=torch.long, device=input_ids.device)
    for token in tokens:
        out.append(torch.where(done, torch.full_like(token, pad_id), token))
        done |= torch.isin(token, eos)
    return torch.cat([input_ids, *[t[:, None] for t in out]], dim=1)


class TextStream:
    """Turns tokens into text pieces: never splits a multi-byte character, never emits a stop string or
    any text after it, and holds back a tail that could still become a stop string."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.emitted = 0
        self.stopped = False

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._take(text[:cut])
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return ""
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return self._take(text[: len(text) - hold])

    def flush(self) -> str:
        """The held-back tail once generation ends without a stop string."""
        if self.stopped:
            return ""
        return self._take(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _take(self, text: str) -> str:
        piece = text[self.emitted:]
        self.emitted = max(self.emitted, len(text))
        return piece


@dataclass
class Reply:
    """A streamed text reply, what generate(..., stream=True) returns: iterate it for the text pieces; close()
    ends the generation early (between tokens the model is free, so nothing is left half done). Once it has
    ended, `completion_tokens` (every token generated, an EOS included) and `finish_reason` ("stop": EOS or a
    stop string; "length": max_new_tokens or the model's context) say how: what an OpenAI-style server reports
    as usage. A reply closed early keeps finish_reason None."""

    prompt_tokens: int
    completion_tokens: int = 0
    finish_reason: str | None = None
    pieces: Iterator[str] = field(default_factory=lambda: iter(()), repr=False)

    def __iter__(self) -> Reply:
        return self

    def __next__(self) -> str:
        return next(self.pieces)

    def close(self) -> None:
        close = getattr(self.pieces, "close", None)
        if close is not None:
            close()
