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

Offloaded experts cut a step into pieces, one graph each (piecewise capture, as vLLM's): a piece runs from one
offloaded MoE layer's expert products to the next one's routing. Between pieces the host reads that layer's
routing (its one sync), the engine puts those experts in device slots (copies and prefetches as in an eager
step) and writes the expert -> slot table to the device; the next piece gathers the experts' weights from the
slots by that table (moe_on_device over `slot_stacks`), so routing results and slot ids never leave the device.
Decoder hooks run there too, between the pieces, when they are `replayable` (prefetch prediction from the
attention state, routing traces), which needs every MoE layer to be a cut.

Not captured (decoded eagerly): MLA and Gated DeltaNet layers, quantized experts, misses computed on the
host, slots too few for a step's experts, hooks that act at every layer.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from ..spec import AttentionSpec
from .kv_cache import KVCache, bucket
from .moe import device_stacks, host_routing, moe_on_device

MAX_STEP_TOKENS = 8  # tokens per row a replayed step may take (1 + the most drafts a verify step checks)


def unsupported(decoder) -> str | None:
    """Why this decoder's steps cannot be captured whatever their size, or None."""
    if any(not isinstance(layer.attention, AttentionSpec) or layer.attention.mla for layer in decoder.spec.layers):
        return "MLA and Gated DeltaNet layers are not captured yet"
    if not all(hook.replayable for hook in decoder.hooks):
        return "a decoder hook (prefetch from layer outputs, calibration) runs at every layer"
    return None


def slot_stacks(decoder, layer: int, pairs: int) -> dict[str, torch.Tensor] | None:
    """MoE layer `layer`'s device slots stacked per weight, when a step of `pairs` (token, expert) pairs can take
    its experts from them (OffloadedExperts.slot_stacks), else None."""
    provider = decoder.experts
    if not hasattr(provider, "slot_stacks"):
        return None
    return provider.slot_stacks(layer, min(decoder.spec.router.num_experts, pairs))


class StaticStep:
    """A decode step of `tokens` tokens per row over static buffers: `load` copies a step's inputs in, `run`
    computes its final-norm hidden states [B, T, H], reading only the buffers and the cache (whose `length`
    the caller moves after). The step is `pieces()` pieces: piece j ends at the routing of MoE layer cuts[j]
    (whose experts come from device slots), and `between(j, ...)` is the host's part after it."""

    def __init__(self, decoder, batch: int, tokens: int = 1) -> None:
        dev, spec = decoder.device, decoder.spec
        self.decoder = decoder
        self.ids = torch.zeros(batch, tokens, dtype=torch.long, device=dev)
        self.positions = torch.zeros(batch, tokens, dtype=torch.long, device=dev)
        self.valid = torch.ones(batch, tokens, dtype=torch.bool, device=dev)
        self.offsets = torch.arange(tokens, device=dev)
        self.index = torch.zeros(tokens, dtype=torch.long, device=dev)  # the tokens' sequence indices
        pairs = batch * tokens * spec.router.top_k if spec.router else 0
        self.cuts = [i for i in spec.moe_layers if device_stacks(decoder.experts, i, pairs, dev) is None]
        self.slots = {i: slot_stacks(decoder, i, pairs) for i in self.cuts}
        # MoE layer -> expert -> its slot, written by the host between pieces (experts not routed: slot 0)
        self.tables = {i: torch.zeros(spec.router.num_experts, dtype=torch.long, device=dev) for i in self.cuts}

    def load(self, tokens: torch.Tensor, cache: KVCache, positions: torch.Tensor, valid: torch.Tensor) -> None:
        self.ids.copy_(tokens)
        self.positions.copy_(positions)
        self.valid.copy_(valid)
        torch.add(self.offsets, cache.length, out=self.index)

    def pieces(self) -> int:
        return len(self.cuts) + 1

    def piece(self, j: int, cache: KVCache, before: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Piece j, from what piece j - 1 returned: the previous cut's experts (from its slots) and residual,
        the layers up to cut j, and cut j's attention and routing -> h, x, weights, ids, and `done`: the
        previous cut's output, for its hooks. The last piece returns `hidden` (final norm) and `done`."""
        d = self.decoder
        step = d.step(cache, self.index, self.positions, self.valid)
        out = {}
        if j == 0:
            h, first = F.embedding(self.ids, d.embed), 0
        else:
            cut = self.cuts[j - 1]
            x, ids = before["x"], before["ids"]
            routed = moe_on_device(x, before["weights"], self.tables[cut][ids], self.slots[cut], d.spec.expert)
            h = out["done"] = d.add_moe(cut, before["h"], x, routed)
            first = cut + 1
        last = self.cuts[j] if j < len(self.cuts) else len(d.layers)
        for i in range(first, last):
            h, x = d.mix(i, h, step, cache)
            h = d.mlp(i, h, x, cache)
        if j == len(self.cuts):
            return out | {"hidden": d.final_norm(h)}
        h, x = d.mix(last, h, step, cache)
        weights, ids = d.route(last, x)
        return out | {"h": h, "x": x, "weights": weights, "ids": ids}

    def between(self, j: int, cache: KVCache, outs: list[dict[str, torch.Tensor]]) -> None:
        """The host's part after piece j (outs: the pieces' outputs so far): the hooks at the previous cut's
        end and at cut j's routing, then cut j's one host sync (its experts and those predicted for later
        layers), the experts placed in slots, and their slot table written for piece j + 1. After the last
        piece (j = pieces() - 1): the last cut's hooks only."""
        d, now = self.decoder, outs[j]
        if j:
            for hook in d.hooks:
                hook.layer_done(self.cuts[j - 1], now["done"], outs[j - 1]["x"], cache)
        if j == len(self.cuts):
            return
        cut, r = self.cuts[j], d.spec.router
        early = [p for hook in d.hooks for p in hook.routed(cut, now["h"], now["x"], now["weights"], now["ids"],
                                                           cache)]
        experts, mass, tokens, prefetch = host_routing(now["weights"], now["ids"], r, early, d.prefetch_count)
        table = torch.zeros(r.num_experts, dtype=torch.long)
        table[experts] = torch.tensor(d.experts.place(cut, experts, mass, tokens, prefetch))
        self.tables[cut].copy_(table)

    def run(self, cache: KVCache, host: bool = True, graphs: list[torch.cuda.CUDAGraph] | None = None,
            outs: list[dict[str, torch.Tensor]] | None = None) -> torch.Tensor:
        """The step: each piece, eagerly or by replaying its graph (whose outputs are `outs`), and the host's
        part after each; without `host` the slot tables stay as they are and no hook runs (a warm-up, or the
        check of a replay)."""
        if host:
            for hook in self.decoder.hooks:
                hook.start(self.ids.shape[1])
        done: list[dict[str, torch.Tensor]] = []
        for j in range(self.pieces()):
            if graphs:
                graphs[j].replay()
                done.append(outs[j])
            else:
                done.append(self.piece(j, cache, done[-1] if done else {}))
            if host:
                self.between(j, cache, done)
        return done[-1]["hidden"]


class DecodeGraphs:
    """One graph per piece of each (batch size, tokens per row, key bucket), all sharing one memory pool (they
    replay one after another); the KV cache per batch size is leased to one generation at a time (a second,
    concurrent one decodes eagerly on a cache of its own)."""

    def __init__(self, decoder) -> None:
        self.decoder = decoder
        self.graphs: dict[tuple[int, int, int], tuple[list[torch.cuda.CUDAGraph], StaticStep, list[dict]]] = {}
        self.caches: dict[int, KVCache] = {}
        self.leased: set[int] = set()
        self.pool = None
        self.captured = 0  # graphs captured so far (stats)
        self.failed: str | None = None  # why a capture failed: graphs are then off for this decoder

    def unavailable(self, batch: int, tokens: int = 1) -> str | None:
        """Why steps of `tokens` tokens for `batch` rows cannot be replayed, or None."""
        d = self.decoder
        reason = self.failed or unsupported(d)
        if reason is not None or not d.spec.router:
            return reason
        pairs = batch * tokens * d.spec.router.top_k
        stacked = {i: device_stacks(d.experts, i, pairs, d.device) is not None for i in d.spec.moe_layers}
        if not all(on_device or slot_stacks(d, i, pairs) is not None for i, on_device in stacked.items()):
            return ("some MoE layer's experts are neither stacked on the device nor in device slots a step can "
                    "gather them from (quantized, computed on the host, more per step than slots, or too large "
                    "to group)")
        if d.hooks and any(stacked.values()):
            return "decoder hooks run between a step's pieces, so every MoE layer must be offloaded"
        return None

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
        graphs, step, outs = self.graphs[key]
        step.load(tokens, cache, positions, valid)
        hidden = step.run(cache, graphs=graphs, outs=outs)
        cache.length += T
        return hidden.clone()  # the next replay overwrites it

    def _first(self, key: tuple[int, int, int], tokens: torch.Tensor, cache: KVCache, positions: torch.Tensor,
               valid: torch.Tensor) -> torch.Tensor | None:
        """Capture a bucket's graphs, replay them once and check the replay against the eager step on the same
        inputs and slot tables (which rewrites the same keys): graphs that fail to capture or replay other
        numbers turn graphs off for this decoder, with a warning, instead of decoding wrongly."""
        step = StaticStep(self.decoder, *tokens.shape)
        step.load(tokens, cache, positions, valid)
        try:
            graphs, outs = self._capture(step, cache)
        except RuntimeError as e:  # the eager step that follows rewrites the warm-up's keys alike
            return self._off(f"capturing the decode step failed ({e})")
        replayed = step.run(cache, graphs=graphs, outs=outs).clone()
        if not torch.equal(replayed, step.run(cache, host=False)):
            return self._off("a replayed decode step differed from the eager step")
        self.graphs[key] = graphs, step, outs
        cache.length += tokens.shape[1]
        return replayed

    def _off(self, why: str) -> None:
        self.failed = why
        warnings.warn(f"CUDA graphs are off for this model: {why}; decoding eagerly", stacklevel=4)

    def _capture(self, step: StaticStep, cache: KVCache) -> tuple[list[torch.cuda.CUDAGraph], list[dict]]:
        """Capture the step's pieces, its inputs loaded, each piece reading the captured outputs of the one
        before. The warm-up (on a side stream, as torch requires: cuBLAS workspaces, Triton autotuning; slot
        tables as they are, no host part) writes this position's keys, which the replay then rewrites."""
        side, main = torch.cuda.Stream(self.decoder.device), torch.cuda.current_stream(self.decoder.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            for _ in range(2):
                step.run(cache, host=False)
        main.wait_stream(side)
        graphs, outs = [], []
        for j in range(step.pieces()):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                outs.append(step.piece(j, cache, outs[-1] if outs else {}))
            self.pool = graph.pool()
            graphs.append(graph)
        self.captured += len(graphs)
        return graphs, outs
