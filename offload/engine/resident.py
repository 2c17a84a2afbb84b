"""The trivial expert provider: every expert already on the compute device (the no-offload reference)."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext

import torch

ExpertWeights = dict[str, torch.Tensor]


class ResidentExperts:
    def __init__(self, experts: dict[tuple[int, int], ExpertWeights]) -> None:
        self.experts = experts

    def provide(self, layer: int, experts: list[int], weights: list[float], tokens: list[int],
                prefetch: list[tuple[int, list[int]]]) -> Iterator[list[tuple[int, ExpertWeights]]]:
        yield [(e, self.experts[layer, e]) for e in experts]

    def prefetch(self, predictions: list, count: int) -> None:
        """Nothing to prefetch: every expert is resident."""

    def call(self) -> nullcontext:
        """Nothing to roll back after an interrupted call: nothing moves."""
        return nullcontext()

    def stats(self) -> dict:
        return {"resident_experts": len(self.experts)}
