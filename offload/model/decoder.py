"""The one generic decoder: embeddings -> layers (attention, then dense MLP or MoE) -> norm -> lm_head.

Everything architecture-specific is in the ModelSpec; weights are canonical names (see
`ModelSpec.expected_shapes`) and routed experts come from an ExpertProvider.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..spec import ExpertSpec, ModelSpec
from .attention import attention
from .kv_cache import KVCache
from .moe import ExpertProvider, expert_mlp, expert_scores, moe, route
from .norm import rms_norm
from .predictor import apply as apply_predictor
from .rope import RotaryTable
from .threads import threads_for, with_threads


def _group(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


class Decoder:
    def __init__(self, spec: ModelSpec, weights: dict[str, torch.Tensor], experts: ExpertProvider,
                 device: torch.device, dtype: torch.dtype, prefetch: int = 0, prefetch_count: int = 0,
                 predict_from: str = "attention") -> None:
        """prefetch: how many later MoE layers to predict from each layer's hidden state (0 = none);
        prefetch_count: experts predicted per later layer (default: the router's top-k); predict_from:
        "attention" predicts from the state after a layer's attention (the copies overlap that layer's expert
        compute), "output" from the layer's output (more accurate, less overlap, one more host sync)."""
        if predict_from not in ("attention", "output"):
            raise ValueError(f"predict_from must be 'attention' or 'output', got {predict_from!r}")
        self.spec, self.experts, self.device, self.dtype = spec, experts, device, dtype
        self.prefetch, self.predict_from = prefetch, predict_from
        self.prefetch_count = prefetch_count or (spec.router.top_k if spec.router else 0)
        self.recorder = None  # an engine.recorder.RoutingRecorder when routing traces are recorded
        self.predictors: dict[int, torch.Tensor] = {}  # MoE layer -> learned prefetch correction (predictor.py)
        self.collect: dict[int, tuple[list, list]] | None = None  # predictor calibration: (early, router input)
        self._early: dict[int, torch.Tensor] = {}
        self.embed = weights["embed"]
        self.norm = weights["norm"]
        self.lm_head = weights["embed"] if spec.tie_word_embeddings else weights["lm_head"]
        self.layers = [{part: _group(weights, f"layers.{i}.{part}.") for part in ("attn", "mlp", "router")}
                       | {"input_norm": weights[f"layers.{i}.input_norm"],
                          "post_attn_norm": weights[f"layers.{i}.post_attn_norm"]}
                       for i in range(len(spec.layers))]
        self.rotary = {layer.attention.rope: RotaryTable(layer.attention.rope, device) for layer in spec.layers}
        self.threads = threads_for(weights.values(), device)

    def new_cache(self, batch: int, max_len: int, slack: int = 0) -> KVCache:
        return KVCache([layer.attention for layer in self.spec.layers], batch, max_len, self.dtype, self.device,
                       slack)

    @with_threads
    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache, positions: torch.Tensor,
                      valid: torch.Tensor) -> torch.Tensor:
        """Run T new tokens per row through every layer, extending `cache`; returns the final-norm states."""
        spec = self.spec
        T = input_ids.shape[1]
        q_index = torch.arange(cache.length, cache.length + T, device=self.device)
        cos_sin = {rope: table.cos_sin(positions, self.dtype) for rope, table in self.rotary.items()}
        h = F.embedding(input_ids, self.embed)
        recording = self.recorder is not None and T == 1
        if recording:
            self.recorder.step()
        for i, (layer, w) in enumerate(zip(spec.layers, self.layers)):
            a = layer.attention
            h = h + attention(rms_norm(h, w["input_norm"], spec.rms_norm_eps), w["attn"], a, spec.rms_norm_eps,
                              cos_sin[a.rope], cache.layers[i], q_index, valid)
            x = rms_norm(h, w["post_attn_norm"], spec.rms_norm_eps)
            if layer.mlp == "dense":
                h = h + expert_mlp(x, w["mlp"], ExpertSpec(layer.dense_intermediate_size))
            else:
                weights, ids = route(x.reshape(-1, x.shape[-1]), w["router"], spec.router)
                if self.collect is not None and T == 1:  # decode steps: where prefetching happens
                    self._collect(h, x, i, cache)
                if recording:
                    self.recorder.record(i, ids, weights)
                early = self._predict(h, i, cache) if self.predict_from == "attention" else []
                if self.predictors or self.collect is not None:  # a view of a prompt's x would keep all of it alive
                    cache.router_inputs[i] = x[:, -1] if T == 1 else x[:, -1].clone()
                h = h + moe(x, i, weights, ids, spec.router, spec.expert, self.experts, early, self.prefetch_count)
            if self.prefetch and self.predict_from == "output":
                self.experts.prefetch(self._predict(h, i, cache), self.prefetch_count)
        cache.length += T
        return rms_norm(h, self.norm, spec.rms_norm_eps)

    def _predict(self, h: torch.Tensor, layer: int, cache: KVCache) -> list[tuple[int, torch.Tensor]]:
        """Expert scores of the next `prefetch` MoE layers, from their routers applied to this hidden state
        (for the next one, through its learned predictor when the checkpoint has one and the sequence has
        a previous token)."""
        later = [j for j in self.spec.moe_layers if j > layer][: self.prefetch]
        flat = h.reshape(-1, h.shape[-1])
        predictions = []
        for j in later:
            x = rms_norm(flat, self.layers[j]["post_attn_norm"], self.spec.rms_norm_eps)
            previous = cache.router_inputs.get(j)
            if j == later[0] and j in self.predictors and previous is not None and self.predict_from == "attention":
                x = apply_predictor(self.predictors[j], x, previous.repeat_interleave(h.shape[1], 0))
            weights, ids = route(x, self.layers[j]["router"], self.spec.router)
            predictions.append((j, expert_scores(weights, ids, self.spec.router.num_experts)))
        return predictions

    def _collect(self, h: torch.Tensor, x: torch.Tensor, layer: int, cache: KVCache) -> None:
        """Calibration pairs: features (the state after the previous MoE layer's attention, normed as this
        layer's router input is; this layer's router input at the previous token) and the router input."""
        early = self._early.pop(layer, None)
        previous = cache.router_inputs.get(layer)
        if early is not None and previous is not None:
            self.collect[layer][0].append(torch.cat((early, previous), -1))
            self.collect[layer][1].append(x.reshape(-1, x.shape[-1]))
        later = [j for j in self.spec.moe_layers if j > layer]
        if later:
            self._early[later[0]] = rms_norm(h.reshape(-1, h.shape[-1]), self.layers[later[0]]["post_attn_norm"],
                                             self.spec.rms_norm_eps)

    @with_threads
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head)
