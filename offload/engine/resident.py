"""The trivial expert provider: every expert already on the compute device (the no-offload reference)."""
from __future__ import annotations

import torch

ExpertWeights = dict[str, torch.Tensor]


class ResidentExperts:
    def __init__(self, experts: dict[tuple[int, int], ExpertWeights]) -> None:
        self.experts = experts

    def fetch(self, layer: int, experts: list[int]) -> dict[int, ExpertWeights]:
        return {e: self.experts[layer, e] for e in experts}

    def stats(self) -> dict:
        return {"resident_experts": len(self.experts)}
