"""The trivial expert provider: every expert already on the compute device (the no-offload reference)."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext

import torch
from offload.kernels import fused_moe

ExpertWeights = dict[str, torch.Tensor]


class ResidentExperts:
    """`stack`: keep each MoE layer's experts as one tensor per weight ([E, ...]; each expert's dict holds
    views of it, so no memory is added), for `moe_on_device`: routing that never leaves the device, which a
    CUDA graph can capture. Only layers whose experts are all plain tensors of one shape are stacked."""

    def __init__(self, experts: dict[tuple[int, int], ExpertWeights], stack: bool = False) -> None:
        self.experts = experts
        self.stacks: dict[int, dict[str, torch.Tensor]] = {}
        self.tables: dict[tuple, object] = {}  # native_table's, per (layer, build, sizes)
        if stack:
            for layer in sorted({layer for layer, _ in experts}):
                self._stack(layer)

    def _layer(self, layer: int) -> list[ExpertWeights] | None:
        """The layer's experts in id order, or None unless their ids are 0..E-1 (both per-layer forms index
        experts by id)."""
        ids = sorted(e for (l, e) in self.experts if l == layer)
        return [self.experts[layer, e] for e in ids] if ids == list(range(len(ids))) else None

    def _stack(self, layer: int) -> None:
        rows = self._layer(layer)
        if rows is None or not all(
                isinstance(t, torch.Tensor) and t.shape == rows[0][name].shape and t.dtype == rows[0][name].dtype
                for w in rows for name, t in w.items()) or any(w.keys() != rows[0].keys() for w in rows):
            return
        stacks = {}
        for name in list(rows[0]):  # one weight at a time: the peak is one layer's weight twice
            stacks[name] = torch.stack([w.pop(name) for w in rows])
            for e, w in enumerate(rows):
                w[name] = stacks[name][e]
        self.stacks[layer] = stacks

    def stacked(self, layer: int) -> dict[str, torch.Tensor] | None:
        return self.stacks.get(layer)

    def native_table(self, layer: int, gemv, hidden: int, inner: int):
        """The layer's experts as one descriptor table for the CPU kernel's moe_pairs (kernels.fused_moe.table),
        made once per build; None when the kernel cannot read them all (or they are not 0..E-1)."""
        key = (layer, gemv, hidden, inner)
        if key not in self.tables:
            rows = self._layer(layer)
            self.tables[key] = None if rows is None else fused_moe.table(rows, gemv, hidden, inner)
        return self.tables[key]

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
