"""What watches a decoder's forward pass without changing its output: routing traces, prefetch prediction,
predictor calibration. The decoder calls every attached hook at fixed points and knows nothing else of them."""
from __future__ import annotations

import torch

from .kv_cache import KVCache

Predictions = list[tuple[int, torch.Tensor]]  # (later MoE layer, expert scores [E])


class DecoderHook:
    """No-op defaults; a hook overrides what it needs. Per generate call: begin(batch) ... end(). Per forward
    pass of T tokens: start(T); then for each layer i: routed(...) at MoE layers, after the router and before
    the experts, and layer_done(...) after the layer."""

    # Whether the hook may run between the pieces of a decode step replayed from CUDA graphs, which end at the
    # MoE layers (decode_graphs.StaticStep): its layer_done does nothing at other layers, and it keeps no tensor
    # it is handed past the next time that layer runs (they are the graphs' buffers, rewritten by each replay).
    replayable = True

    def begin(self, batch: int) -> None:
        """A generate call starts with `batch` rows."""

    def end(self) -> None:
        """That generate call is over (normally or not)."""

    def start(self, tokens: int) -> None:
        """A forward pass of `tokens` new tokens per row starts."""

    def routed(self, layer: int, h: torch.Tensor, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
               cache: KVCache) -> Predictions:
        """h [B, T, H]: the state after the layer's attention; x: its normed router input; (weights, ids) [B*T, k]
        the routing. Returns expert scores predicted for later layers, which the MoE block hands to the
        expert provider to copy ahead."""
        return []

    def layer_done(self, layer: int, h: torch.Tensor, x: torch.Tensor, cache: KVCache) -> None:
        """h: the layer's output; x: its normed MLP input (the router input at MoE layers)."""
