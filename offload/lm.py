"""The user-facing model: forward(), generate() over tensors, text or chat, and stats()."""
from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from .chat import render_chat
from .errors import ModelFormatError
from .generate import Reply, Sampling, TextStream, check_mask, collect_ids, context_budget, stop_at_context, token_loop
from .loader import generation_eos
from .model.decoder import Decoder
from .model.mtp import MTPHead, mtp_weights
from .spec import ModelSpec
from .speculative import DraftLength, SpecStats, speculative_loop

Messages = list[dict[str, str]]
GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")  # AutoTokenizer maps these to themselves


class MoEModel:
    """Calls from several threads take turns (one decoder step at a time, see `_turn`); a call interrupted
    anywhere, Ctrl-C included, leaves the model as good as new."""

    def __init__(self, decoder: Decoder, spec: ModelSpec, path: Path, mtp: dict[str, torch.Tensor]) -> None:
        self.decoder, self.spec, self.path, self.mtp = decoder, spec, path, mtp
        self._lock = threading.Lock()
        self.plan = None  # the planner's Plan when cache_experts="auto"
        self._tokenizer = None
        self._mtp_head: MTPHead | None = None
        self.spec_stats = SpecStats()
        self._draft_length: DraftLength | None = None
        self.eos_token_ids: list[int] = generation_eos(path, spec)

    @property
    def device(self) -> torch.device:
        return self.decoder.device

    @property
    def tokenizer(self):
        """The checkpoint's tokenizer (transformers' fast tokenizer, for its chat template); loaded on first use.

        A tokenizer_config.json that names transformers' generic class (the demo's does) gets that class
        directly: AutoTokenizer would pick the same one after scanning every model's import structure (~0.3 s)."""
        if self._tokenizer is None:
            import transformers

            try:
                config_file = self.path / "tokenizer_config.json"
                config = json.loads(config_file.read_text()) if config_file.is_file() else {}
                name = config.get("tokenizer_class")  # AttributeError when the file is not a JSON object
                generic = name in GENERIC_TOKENIZERS and (self.path / "tokenizer.json").is_file()
                tokenizer = (getattr(transformers, name) if generic else transformers.AutoTokenizer).from_pretrained(
                    str(self.path))
            except Exception as e:  # noqa: BLE001 - broken tokenizer files fail in many ways, each one line here
                reason = (str(e).strip().splitlines() or [""])[0][:200]
                raise ModelFormatError(
                    f"{self.path} has no usable tokenizer ({type(e).__name__}: {reason}); fix or re-download "
                    "tokenizer.json + tokenizer_config.json, or pass token ids instead of text") from None
            if tokenizer.vocab_size > self.spec.vocab_size:  # added tokens past it fail where used
                raise ModelFormatError(
                    f"{self.path}: the tokenizer has {tokenizer.vocab_size} tokens but config.json's vocab_size is "
                    f"{self.spec.vocab_size}; the tokenizer belongs to another model: use the model's own")
            self._tokenizer = tokenizer
        return self._tokenizer

    def _check_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int):
            raise ValueError(f"input_ids must be an integer tensor [batch, tokens], got {input_ids.dtype} "
                             f"{tuple(input_ids.shape)}")
        if input_ids.shape[1] == 0:
            raise ValueError("the prompt is empty (0 tokens); give at least one token (e.g. the BOS token)")
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.spec.vocab_size):
            raise ValueError(f"input_ids hold values outside the vocabulary [0, {self.spec.vocab_size}) "
                             f"(min {int(input_ids.min())}, max {int(input_ids.max())}); "
                             "tokenize with this model's tokenizer")
        return input_ids.long().to(self.device)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Stateless full forward: logits [B, T, V] (fp32)."""
        input_ids = self._check_ids(input_ids)
        B, T = input_ids.shape
        context_budget(T, 0, self.spec.max_position_embeddings)
        valid = check_mask(attention_mask, input_ids, left_padded=False)
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
        with self._turn():
            hidden = self.decoder.hidden_states(input_ids, self.decoder.new_cache(B, T), positions, valid)
            return self.decoder.logits(hidden).float()

    @contextmanager
    def _turn(self) -> Iterator[None]:
        """One stretch of decoder work: alone on the model (the expert engine's slots and copier, the torch
        thread setting and the counters serve one caller at a time), in inference mode, and inside the engine's
        `call`, which rolls back whatever an interrupted stretch left half done."""
        with self._lock, torch.inference_mode(), self.decoder.experts.call():
            yield

    def _in_turns(self, steps: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
        """A token loop advanced one `_turn` per token. Between tokens the model is free: its state is whole
        there and each loop keeps its own KV cache, so other calls may run, and a stream that is never finished
        holds nothing."""
        while True:
            with self._turn():
                token = next(steps, None)
            if token is None:
                return
            yield token

    __call__ = forward

    def prompt_ids(self, prompt: str | Messages) -> torch.Tensor:
        """Token ids [1, T] of a text prompt, or of chat messages through the chat template."""
        tok = self.tokenizer
        if isinstance(prompt, str):
            ids = tok(prompt)["input_ids"]
        else:  # as apply_chat_template(add_generation_prompt=True) would, with bounded rendering (offload.chat)
            ids = tok(render_chat(tok, prompt, str(self.path)), add_special_tokens=False)["input_ids"]
        return torch.tensor([list(ids)], dtype=torch.long)

    @torch.inference_mode()
    def generate(self, prompt: torch.Tensor | str | Messages, max_new_tokens: int = 128, *,
                 attention_mask: torch.Tensor | None = None, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, repetition_penalty: float = 1.0, seed: int | None = None,
                 stop: Sequence[str] | str = (), stream: bool = False, eos_token_ids: Sequence[int] | None = None,
                 speculative: str | None = None, draft_tokens: int = 3) -> torch.Tensor | str | Reply:
        """Tensor in -> tensor [B, T+N] out (greedy by default). Text or chat messages in -> the reply text,
        or with stream=True a Reply: an iterator of text pieces that counts its tokens and says why it ended.
        Stops at EOS, a stop string, or max_new_tokens.
        speculative="mtp": draft up to `draft_tokens` tokens per step with the checkpoint's MTP layer and
        verify them in one forward (same output as plain decoding; single sequence only)."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        sampling = Sampling(temperature, top_p, top_k, repetition_penalty, seed)
        eos = list(self.eos_token_ids if eos_token_ids is None else eos_token_ids)
        if speculative not in (None, "mtp"):
            raise ValueError(f"speculative must be None or 'mtp', got {speculative!r}")
        if speculative and (not isinstance(draft_tokens, int) or draft_tokens < 1):
            raise ValueError(f"draft_tokens must be an integer >= 1, got {draft_tokens!r}")
        draft = draft_tokens if speculative else 0
        if isinstance(prompt, torch.Tensor):
            if stream or stop:
                raise ValueError("stream and stop need a text prompt; with token ids use max_new_tokens and EOS")
            ids = self._check_ids(prompt)
            mask = check_mask(attention_mask, ids, left_padded=True)
            pad = self.spec.pad_token_id if self.spec.pad_token_id is not None else (eos[0] if eos else 0)
            if max_new_tokens == 0:
                return ids
            return collect_ids(ids, self._tokens(ids, mask, max_new_tokens, sampling, eos, draft), eos, pad)
        ids = self._check_ids(self.prompt_ids(prompt))
        reply = Reply(prompt_tokens=ids.shape[1])
        reply.pieces = self._stream_text(ids, max_new_tokens, sampling, eos,
                                         [stop] if isinstance(stop, str) else stop, draft, reply)
        return reply if stream else "".join(reply)

    def _tokens(self, ids: torch.Tensor, mask: torch.Tensor | None, max_new_tokens: int, sampling: Sampling,
                eos: list[int], draft: int) -> Iterator[torch.Tensor]:
        """The new tokens, at most up to the model's context limit (generate.context_budget)."""
        limit = self.spec.max_position_embeddings
        budget = context_budget(ids.shape[1], max_new_tokens, limit)
        return stop_at_context(self._steps(ids, mask, budget, sampling, eos, draft), budget, max_new_tokens, limit,
                               eos)

    def _steps(self, ids: torch.Tensor, mask: torch.Tensor | None, max_new_tokens: int, sampling: Sampling,
               eos: list[int], draft: int) -> Iterator[torch.Tensor]:
        if not draft:
            return self._in_turns(token_loop(self.decoder, ids, mask, max_new_tokens, sampling, eos))
        if mask is not None and not bool(mask.all()):
            raise ValueError("speculative decoding runs one unpadded sequence; drop attention_mask padding")
        if self._draft_length is None or self._draft_length.max_k != draft:  # its estimates outlive one call
            self._draft_length = DraftLength(draft)
        return self._in_turns(speculative_loop(self.decoder, self.mtp_head, ids, max_new_tokens, sampling, eos,
                                               draft, self.spec_stats, self._draft_length))

    @property
    def mtp_head(self) -> MTPHead:
        if self._mtp_head is None:
            weights = mtp_weights(self.mtp)
            if weights is None:
                raise ValueError(f"{self.path} has no MTP layer (model.mtp.layers.0.*, or DeepSeek-V3's and GLM-4.5's "
                                 "model.layers.{num_hidden_layers}.*); speculative='mtp' needs one: use a checkpoint "
                                 "with MTP weights or drop speculative")
            d = self.decoder
            self._mtp_head = MTPHead(weights, self.spec, d.embed, d.lm_head, d.device, d.dtype)
        return self._mtp_head

    def _stream_text(self, ids: torch.Tensor, max_new_tokens: int, sampling: Sampling, eos: list[int],
                     stop: Sequence[str], draft: int, reply: Reply) -> Iterator[str]:
        """The reply's pieces; counts its tokens and records why it ended in `reply`."""
        text = TextStream(self.tokenizer, stop)
        for token in self._tokens(ids, None, max_new_tokens, sampling, eos, draft):
            reply.completion_tokens += 1
            if int(token[0]) in eos:
                reply.finish_reason = "stop"
                break
            piece = text.push(int(token[0]))
            if piece:
                yield piece
            if text.stopped:
                reply.finish_reason = "stop"
                return
        reply.finish_reason = reply.finish_reason or "length"
        tail = text.flush()
        if tail:
            yield tail

    def stats(self) -> dict:
        with self._lock:
            graphs = self.decoder.graphs
            return self.decoder.experts.stats() | {"speculative": self.spec_stats.summary(), "cuda_graphs": {
                "captured": graphs.captured if graphs else 0,
                "off": "not on a GPU, or load(cuda_graphs=False)" if graphs is None else graphs.unavailable(1)}}
