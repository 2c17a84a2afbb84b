"""Decode steps captured as CUDA graphs and replayed (as gpt-fast, vLLM and llama.cpp do): a step then costs
one launch instead of a few hundred kernel launches and the Python between them. A step is one token per row
(plain decoding) or up to MAX_STEP_TOKENS (a speculative verify step: the last token and its drafts); each
length gets graphs of its own.

A graph replays fixed addresses, so the runner owns what a step reads and writes: static input buffers (token
ids, positions, validity, the write indices) and one KV cache per batch size, preallocated and reused across
calls. A step attends over a power-of-two bucket of keys (kv_cache.bucket), so one graph serves every position
of its bucket; a roll-back of rejected drafts (KVCache.truncate) runs eagerly between replays. Eager and
replayed steps run the same ops on tensors of the same shapes and strides, so their outputs are equal bit for
bit (tests/test_cuda.py); `StaticStep` is the part a graph captures, and it runs eagerly on any device
(tests/test_decode_graphs.py checks it on the CPU against the plain decode).

Used only where a step has no host sync: attention layers (not MLA or Gated DeltaNet yet), no decoder hooks
(prefetch prediction, routing traces), and every MoE layer's experts stacked on the device
(ResidentExperts(stack=True) -> moe_on_device). Offloaded and quantized experts decode eagerly.
"""
from __future__ import annotations

import warnings

import torch

from ..spec import AttentionSpec
from .kv_cache import KVCache, bucket
from .moe import device_stacks

MAX_STEP_TOKENS = 8  # tokens per row a replayed step may take (1 + the most drafts a verify step checks)


def unsupported(decoder) -> str | None:
    """Why this decoder's step cannot be captured, or None."""
    if any(not isinstance(layer.attention, AttentionSpec) or layer.attention.mla for layer in decoder.spec.layers):
        return "MLA and Gated DeltaNet layers are not captured yet"
    if decoder.hooks:
        return "decoder hooks (prefetch prediction, routing traces) run Python at every layer"
    return None


class StaticStep:
    """A decode step of `tokens` tokens per row over static buffers: `load` copies a step's inputs in, `run`
    computes its final-norm hidden states [B, T, H], reading only the buffers and the cache (whose `length`
    the caller moves after)."""

    def __init__(self, decoder, batch: int, tokens: int = 1) -> None:
        dev = decoder.device
        self.decoder = decoder
        self.ids = torch.zeros(batch, tokens, dtype=torch.long, device=dev)
        self.positions = torch.zeros(batch, tokens, dtype=torch.long, device=dev)
        self.valid = torch.ones(batch, tokens, dtype=torch.bool, device=dev)
        self.offsets = torch.arange(tokens, device=dev)
        self.index = torch.zeros(tokens, dtype=torch.long, device=dev)  # the tokens' sequence indices

    def load(self, tokens: torch.Tensor, cache: KVCache, positions: torch.Tensor, valid: torch.Tensor) -> None:
        self.ids.copy_(tokens)
        self.positions.copy_(positions)
        self.valid.copy_(valid)
        torch.add(self.offsets, cache.length, out=self.index)

    def run(self, cache: KVCache) -> torch.Tensor:
        d = self.decoder
        return d.run_layers(self.ids, cache, d.step(cache, self.index, self.positions, self.valid))


class DecodeGraphs:
    """One graph per (batch size, tokens per row, key bucket), sharing one memory pool; the KV cache per batch
    size is leased to one generation at a time (a second, concurrent one decodes eagerly on a cache of its
    own)."""

    def __init__(self, decoder) -> None:
        self.decoder = decoder
        self.graphs: dict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph, StaticStep, torch.Tensor]] = {}
        self.caches: dict[int, KVCache] = {}
        self.leased: set[int] = set()
        self.pool = None
        self.captured = 0  # graphs captured so far (stats)
        self.failed: str | None = None  # why a capture failed: graphs are then off for this decoder

    def unavailable(self, batch: int, tokens: int = 1) -> str | None:
        """Why steps of `tokens` tokens for `batch` rows cannot be replayed, or None."""
        d = self.decoder
        reason = self.failed or unsupported(d)
        pairs = batch * tokens * d.spec.router.top_k if d.spec.router else 0
        if reason is None and any(layer.mlp != "dense" and device_stacks(d.experts, i, pairs, d.device) is None
                                  for i, layer in enumerate(d.spec.layers)):
            reason = "the experts are not all stacked on the device (offloaded, quantized or too large to group)"
        return reason

    def lease(self, batch: int, max_len: int, slack: int = 0) -> KVCache | None:
        """The runner's cache for `batch` rows, emptied, or None (graphs unusable, or the cache is in use).
        `slack`: the most tokens a roll-back may take back (speculative decoding; see KVCache)."""
        if batch in self.leased or self.unavailable(batch):
            return None
        cache = self.caches.get(batch)
        if cache is None or cache.capacity < max_len or cache.slack != slack:
            self.graphs = {key: g for key, g in self.graphs.items() if key[0] != batch}  # they hold the old storage
            self.caches[batch] = None  # free the old storage before allocating the new
            d = self.decoder
            cache = self.caches[batch] = KVCache([layer.attention for layer in d.spec.layers], batch, max_len,
                                                 d.dtype, d.device, slack, preallocate=True, bucketed=True)
        else:
            cache.reset()
        self.leased.add(batch)
        return cache

    def release(self, cache: KVCache) -> None:
        if self.owns(cache):
            self.leased.discard(cache.batch)

    def owns(self, cache: KVCache) -> bool:
        return self.caches.get(cache.batch) is cache

    def replays(self, cache: KVCache, tokens: int) -> bool:
        """Whether a step of `tokens` tokens per row on `cache` is replayed: a decode or verify step (not a
        prefill) on the runner's own cache, graphs on."""
        return (self.owns(cache) and not self.failed and cache.length > 0 and tokens <= MAX_STEP_TOKENS
                and (tokens == 1 or self.unavailable(cache.batch, tokens) is None))

    def hidden(self, tokens: torch.Tensor, cache: KVCache, positions: torch.Tensor,
               valid: torch.Tensor) -> torch.Tensor | None:
        """The final-norm hidden states [B, T, H] of a step on the runner's own cache, by graph replay; None
        when the step cannot be captured (graphs are then off for this decoder, with a warning saying why)."""
        B, T = tokens.shape
        key = (B, T, bucket(cache.length + T))
        if key not in self.graphs:
            return self._first(key, tokens, cache, positions, valid)
        graph, step, out = self.graphs[key]
        step.load(tokens, cache, positions, valid)
        graph.replay()
        cache.length += T
        return out.clone()  # the next replay overwrites `out`

    def _first(self, key: tuple[int, int, int], tokens: torch.Tensor, cache: KVCache, positions: torch.Tensor,
               valid: torch.Tensor) -> torch.Tensor | None:
        """Capture a bucket's graph, replay it once and check the replay against the eager step on the same
        inputs (which rewrites the same keys): a graph that fails to capture or replays other numbers turns
        graphs off for this decoder, with a warning, instead of decoding wrongly."""
        step = StaticStep(self.decoder, *tokens.shape)
        step.load(tokens, cache, positions, valid)
        try:
            graph, step, out = self._capture(step, cache)
        except RuntimeError as e:  # the eager step that follows rewrites the warm-up's keys alike
            return self._off(f"capturing the decode step failed ({e})")
        graph.replay()
        replayed = out.clone()
        if not torch.equal(replayed, step.run(cache)):
            return self._off("a replayed decode step differed from the eager step")
        self.graphs[key] = graph, step, out
        cache.length += tokens.shape[1]
        return replayed

    def _off(self, why: str) -> None:
        self.failed = why
        warnings.warn(f"CUDA graphs are off for this model: {why}; decoding eagerly", stacklevel=4)

    def _capture(self, step: StaticStep, cache: KVCache) -> tuple[torch.cuda.CUDAGraph, StaticStep, torch.Tensor]:
        """Capture the step, its inputs loaded. The warm-up (on a side stream, as torch requires: cuBLAS
        workspaces, Triton autotuning) writes this position's keys, which the replay then rewrites alike."""
        side, main = torch.cuda.Stream(self.decoder.device), torch.cuda.current_stream(self.decoder.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            for _ in range(2):
                step.run(cache)
        main.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = step.run(cache)
        self.pool = graph.pool()
        self.captured += 1
        return graph, step, out
