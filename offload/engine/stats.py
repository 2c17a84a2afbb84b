"""Counters of the expert engine, per MoE layer, and their summary for `model.stats()`."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, fields


@dataclass
class LayerCounters:
    hits: int = 0
    misses: int = 0
    prefetch_issued: int = 0
    prefetch_used: int = 0
    prefetch_wasted: int = 0
    predicted: int = 0  # experts predicted for this layer
    predicted_correct: int = 0  # of those, actually routed to
    routed: int = 0  # experts actually routed to (after a prediction was made)
    bytes_copied: int = 0


class EngineStats:
    def __init__(self) -> None:
        self.layers: dict[int, LayerCounters] = defaultdict(LayerCounters)
        self.wait_seconds = 0.0  # compute blocked on copies
        self.cpu_computed = 0  # misses served on the CPU instead of copied

    def summary(self, copy_seconds: float) -> dict:
        total = LayerCounters()
        for c in self.layers.values():
            for f in fields(LayerCounters):
                setattr(total, f.name, getattr(total, f.name) + getattr(c, f.name))
        accesses = total.hits + total.misses
        return {
            "hits": total.hits, "misses": total.misses,
            "hit_rate": total.hits / accesses if accesses else 0.0,
            "prefetch_issued": total.prefetch_issued, "prefetch_used": total.prefetch_used,
            "prefetch_wasted": total.prefetch_wasted,
            "prediction_recall": total.predicted_correct / total.routed if total.routed else 0.0,
            "prediction_precision": total.predicted_correct / total.predicted if total.predicted else 0.0,
            "bytes_copied": total.bytes_copied, "copy_seconds": copy_seconds, "wait_seconds": self.wait_seconds,
            "cpu_computed": self.cpu_computed,
            "per_layer": {layer: vars(c).copy() for layer, c in sorted(self.layers.items())},
        }
