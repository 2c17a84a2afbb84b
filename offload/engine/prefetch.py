"""Prefetch prediction as a decoder hook: each MoE layer's routers of the next `layers` MoE layers are applied
to its hidden state, and the scores go to the expert provider, which copies the likely experts ahead."""
from __future__ import annotations

import torch

from ..model.hooks import DecoderHook, Predictions
from ..model.kv_cache import KVCache
from ..model.moe import expert_scores, route
from ..model.norm import rms_norm
from ..model.predictor import apply as apply_predictor
from ..model.predictor import keep_router_input


class Prefetcher(DecoderHook):
    def __init__(self, decoder, layers: int, predict_from: str = "attention",
                 predictors: dict[int, torch.Tensor] | None = None) -> None:
        """layers: how many later MoE layers to predict from each layer's hidden state (the decoder's
        prefetch_count experts each); predict_from: "attention" predicts from the state after a
        layer's attention (the copies overlap that layer's expert compute), "output" from the layer's output
        (more accurate, less overlap, one more host sync); predictors: MoE layer -> learned correction
        (predictor.py), which reads each layer's router input at the previous token (kept in the KV cache)."""
        if predict_from not in ("attention", "output"):
            raise ValueError(f"predict_from must be 'attention' or 'output', got {predict_from!r}")
        self.decoder, self.layers, self.predict_from = decoder, layers, predict_from
        self.predictors = predictors or {}
        self.replayable = predict_from == "attention"  # "output" predicts at every layer

    def routed(self, layer: int, h: torch.Tensor, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
               cache: KVCache) -> Predictions:
        return self.predict(h, layer, cache) if self.predict_from == "attention" else []

    def layer_done(self, layer: int, h: torch.Tensor, x: torch.Tensor, cache: KVCache) -> None:
        if self.predictors and layer in self.decoder.spec.moe_layers:
            keep_router_input(layer, x, cache)
        if self.predict_from == "output":
            self.decoder.experts.prefetch(self.predict(h, layer, cache), self.decoder.prefetch_count)

    def predict(self, h: torch.Tensor, layer: int, cache: KVCache) -> Predictions:
        """Expert scores of the next `layers` MoE layers, from their routers applied to this hidden state (for
        the next one, through its learned predictor when there is one and the sequence has a previous token)."""
        spec, weights = self.decoder.spec, self.decoder.layers
        later = [j for j in spec.moe_layers if j > layer][: self.layers]
        flat = h.reshape(-1, h.shape[-1])
        predictions = []
        for j in later:
            x = rms_norm(flat, weights[j]["post_attn_norm"], spec.rms_norm_eps)
            previous = cache.router_inputs.get(j)
            if j == later[0] and j in self.predictors and previous is not None and self.predict_from == "attention":
                x = apply_predictor(self.predictors[j], x, previous.repeat_interleave(h.shape[1], 0))
            scores, ids = route(x, weights[j]["router"], spec.router)
            predictions.append((j, expert_scores(scores, ids, spec.router.num_experts)))
        return predictions

