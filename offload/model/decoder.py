"""The one generic decoder: embeddings -> layers (attention or Gated DeltaNet linear attention, then dense MLP or
MoE, with a shared expert where the model has one) -> norm -> lm_head.

Everything architecture-specific is in the ModelSpec; weights are canonical names (see
`ModelSpec.expected_shapes`) and routed experts come from an ExpertProvider.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..spec import AttentionSpec, ExpertSpec, LinearAttentionSpec, ModelSpec
from .attention import Step, attention, fuse_qkv
from .decode_graphs import DecodeGraphs
from .hooks import DecoderHook
from .kv_cache import KVCache
from .linear import linear
from .linear_attention import gated_deltanet, prepare
from .moe import ExpertProvider, expert_mlp, moe, route, shared_expert
from .norm import rms_norm
from .rope import RotaryTable
from .threads import threads_for, with_threads


def group(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors under `prefix`, the prefix stripped."""
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


def _mixer_weights(w: dict[str, torch.Tensor], a: AttentionSpec | LinearAttentionSpec) -> dict[str, torch.Tensor]:
    return prepare(w) if isinstance(a, LinearAttentionSpec) else fuse_qkv(w, a)


class Decoder:
    def __init__(self, spec: ModelSpec, weights: dict[str, torch.Tensor], experts: ExpertProvider,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.spec, self.experts, self.device, self.dtype = spec, experts, device, dtype
        self.hooks: list[DecoderHook] = []  # prefetch prediction, routing traces, calibration (hooks.py)
        self.prefetch_count = spec.router.top_k if spec.router else 0  # experts copied ahead per predicted layer
        self.embed = weights["embed"]
        self.norm = weights["norm"]
        self.lm_head = weights["embed"] if spec.tie_word_embeddings else weights["lm_head"]
        self.layers = [{"attn": _mixer_weights(group(weights, f"layers.{i}.attn."), layer.attention)}
                       | {part: group(weights, f"layers.{i}.{part}.") for part in ("mlp", "router", "shared")}
                       | {name: weights[f"layers.{i}.{name}"] for name in ("input_norm", "post_attn_norm",
                                                                           "shared_gate")
                          if f"layers.{i}.{name}" in weights}
                       for i, layer in enumerate(spec.layers)]
        self.rotary = {layer.attention.rope: RotaryTable(layer.attention.rope, device) for layer in spec.layers
                       if isinstance(layer.attention, AttentionSpec)}
        self.threads = threads_for(weights.values(), device)
        self.graphs = DecodeGraphs(self) if device.type == "cuda" else None  # None: decode eagerly

    def decode_cache(self, batch: int, max_len: int, slack: int = 0) -> KVCache:
        """A cache for one generation: the graph runner's own when its steps can be replayed (`release` it
        after), else a new one. `slack`: see KVCache."""
        return (self.graphs.lease(batch, max_len, slack) if self.graphs else None) or self.new_cache(batch, max_len,
                                                                                                   slack)

    def release(self, cache: KVCache) -> None:
        if self.graphs:
            self.graphs.release(cache)

    def step_hidden(self, tokens: torch.Tensor, cache: KVCache, positions: torch.Tensor,
                    valid: torch.Tensor) -> torch.Tensor:
        """`hidden_states` of a generation's pass: a decode or verify step on the graph runner's cache is
        replayed from a CUDA graph."""
        if self.graphs and self.graphs.replays(cache, tokens.shape[1]):
            hidden = self.graphs.hidden(tokens, cache, positions, valid)
            if hidden is not None:
                return hidden
        return self.hidden_states(tokens, cache, positions, valid)

    def next_logits(self, tokens: torch.Tensor, cache: KVCache, positions: torch.Tensor,
                    valid: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] after T new tokens per row (`step_hidden`)."""
        return self.logits(self.step_hidden(tokens, cache, positions, valid)[:, -1])

    def new_cache(self, batch: int, max_len: int, slack: int = 0) -> KVCache:
        return KVCache([layer.attention for layer in self.spec.layers], batch, max_len, self.dtype, self.device,
                       slack)

    def step(self, cache: KVCache, index: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> Step:
        """Where a pass's tokens go (`index` [T]: their sequence indices, from cache.length) and their rotary."""
        return Step(cache.length, index, valid,
                    {rope: table.cos_sin(positions, self.dtype) for rope, table in self.rotary.items()})

    @with_threads
    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache, positions: torch.Tensor,
                      valid: torch.Tensor) -> torch.Tensor:
        """Run T new tokens per row through every layer, extending `cache`; returns the final-norm states."""
        T = input_ids.shape[1]
        index = torch.arange(cache.length, cache.length + T, device=self.device)
        h = self.run_layers(input_ids, cache, self.step(cache, index, positions, valid))
        cache.length += T
        return h

    def run_layers(self, input_ids: torch.Tensor, cache: KVCache, step: Step) -> torch.Tensor:
        """The layers of one pass, writing `step`'s entries of `cache` (cache.length is the caller's to move)."""
        h = F.embedding(input_ids, self.embed)
        for hook in self.hooks:
            hook.start(input_ids.shape[1])
        for i in range(len(self.layers)):
            h, x = self.mix(i, h, step, cache)
            h = self.mlp(i, h, x, cache)
            for hook in self.hooks:
                hook.layer_done(i, h, x, cache)
        return self.final_norm(h)

    def mix(self, i: int, h: torch.Tensor, step: Step, cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's attention (or Gated DeltaNet) with its residual, and the normed input of its MLP."""
        a, w, eps = self.spec.layers[i].attention, self.layers[i], self.spec.rms_norm_eps
        x = rms_norm(h, w["input_norm"], eps)
        if isinstance(a, LinearAttentionSpec):
            h = h + gated_deltanet(x, w["attn"], a, eps, step.valid, cache.layers[i])
        else:
            h = h + attention(x, w["attn"], a, eps, step, cache.layers[i])
        return h, rms_norm(h, w["post_attn_norm"], eps)

    def mlp(self, i: int, h: torch.Tensor, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Layer i's dense MLP or MoE block on x, added to the residual h."""
        layer, spec = self.spec.layers[i], self.spec
        if layer.mlp == "dense":
            return h + expert_mlp(x, self.layers[i]["mlp"], ExpertSpec(layer.dense_intermediate_size))
        weights, ids = self.route(i, x)
        early = [p for hook in self.hooks for p in hook.routed(i, h, x, weights, ids, cache)]
        out = moe(x, i, weights, ids, spec.router, spec.expert, self.experts, early, self.prefetch_count)
        return self.add_moe(i, h, x, out)

    def route(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """MoE layer i's routing of x [B, T, H]: (weights, expert ids) [B*T, k]."""
        return route(x.reshape(-1, x.shape[-1]), self.layers[i]["router"], self.spec.router)

    def add_moe(self, i: int, h: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The residual plus MoE layer i's routed output and its shared expert, if it has one."""
        layer = self.spec.layers[i]
        return h + (out + shared_expert(x, self.layers[i], layer) if layer.shared_expert_size else out)

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return rms_norm(h, self.norm, self.spec.rms_norm_eps)

    @with_threads
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden, self.lm_head)  # linear(): the decode GEMV kernel, when there is one
