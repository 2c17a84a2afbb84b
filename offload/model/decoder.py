"""The one generic decoder: embeddings -> layers (attention, then dense MLP or MoE) -> norm -> lm_head.

Everything architecture-specific is in the ModelSpec; weights are canonical names (see
`ModelSpec.expected_shapes`) and routed experts come from an ExpertProvider.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..spec import ExpertSpec, ModelSpec
from .attention import Step, attention, fuse_qkv
from .hooks import DecoderHook
from .kv_cache import KVCache
from .linear import linear
from .moe import ExpertProvider, expert_mlp, moe, route
from .norm import rms_norm
from .rope import RotaryTable
from .threads import threads_for, with_threads


def _group(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


class Decoder:
    def __init__(self, spec: ModelSpec, weights: dict[str, torch.Tensor], experts: ExpertProvider,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.spec, self.experts, self.device, self.dtype = spec, experts, device, dtype
        self.hooks: list[DecoderHook] = []  # prefetch prediction, routing traces, calibration (hooks.py)
        self.prefetch_count = spec.router.top_k if spec.router else 0  # experts copied ahead per predicted layer
        self.embed = weights["embed"]
        self.norm = weights["norm"]
        self.lm_head = weights["embed"] if spec.tie_word_embeddings else weights["lm_head"]
        self.layers = [{"attn": fuse_qkv(_group(weights, f"layers.{i}.attn."), layer.attention)}
                       | {part: _group(weights, f"layers.{i}.{part}.") for part in ("mlp", "router", "shared")}
                       | {"input_norm": weights[f"layers.{i}.input_norm"],
                          "post_attn_norm": weights[f"layers.{i}.post_attn_norm"]}
                       for i, layer in enumerate(spec.layers)]
        self.rotary = {layer.attention.rope: RotaryTable(layer.attention.rope, device) for layer in spec.layers}
        self.threads = threads_for(weights.values(), device)

    def new_cache(self, batch: int, max_len: int, slack: int = 0) -> KVCache:
        return KVCache([layer.attention for layer in self.spec.layers], batch, max_len, self.dtype, self.device,
                       slack)

    @with_threads
    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache, positions: torch.Tensor,
                      valid: torch.Tensor) -> torch.Tensor:
        """Run T new tokens per row through every layer, extending `cache`; returns the final-norm states."""
        spec, hooks = self.spec, self.hooks
        T = input_ids.shape[1]
        step = Step(cache.length, torch.arange(cache.length, cache.length + T, device=self.device), valid,
                    {rope: table.cos_sin(positions, self.dtype) for rope, table in self.rotary.items()})
        h = F.embedding(input_ids, self.embed)
        for hook in hooks:
            hook.start(T)
        for i, (layer, w) in enumerate(zip(spec.layers, self.layers)):
            a = layer.attention
            h = h + attention(rms_norm(h, w["input_norm"], spec.rms_norm_eps), w["attn"], a, spec.rms_norm_eps, step,
                              cache.layers[i])
            x = rms_norm(h, w["post_attn_norm"], spec.rms_norm_eps)
            if layer.mlp == "dense":
                h = h + expert_mlp(x, w["mlp"], ExpertSpec(layer.dense_intermediate_size))
            else:
                weights, ids = route(x.reshape(-1, x.shape[-1]), w["router"], spec.router)
                early = [p for hook in hooks for p in hook.routed(i, h, x, weights, ids, cache)]
                out = moe(x, i, weights, ids, spec.router, spec.expert, self.experts, early, self.prefetch_count)
                if spec.shared_intermediate_size:  # routed + shared, then the residual: transformers' order
                    out = out + expert_mlp(x, w["shared"], ExpertSpec(spec.shared_intermediate_size))
                h = h + out
            for hook in hooks:
                hook.layer_done(i, h, x, cache)
        cache.length += T
        return rms_norm(h, self.norm, spec.rms_norm_eps)

    @with_threads
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return linear(hidden, self.lm_head)  # linear(): the decode GEMV kernel, when there is one
