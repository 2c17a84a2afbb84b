"""placement "split": each MoE layer keeps its hottest experts on the compute device for the whole run and
computes the others on the host, where they live, with the native kernels, on the host worker while the device
computes its own (moe.HostBatch): the split that llama.cpp's --n-cpu-moe and ktransformers make, here chosen
per expert by how often it is routed to. Per token only the cold experts' input rows and outputs cross the
host link, never an expert. Which experts are hot comes from a recorded routing trace, or is adapted at run
time from the routing counts (between model calls, so a call never sees its placement change)."""
from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

from ..model.moe import HostBatch, run_on_host
from ..quantize import prepared
from ..spec import ExpertSpec
from .stats import EngineStats
from .store import ExpertWeights, HostStore
from .trace import TraceRow


def hot_experts(rows: Iterable[TraceRow], layers: list[int], count: int, num_experts: int) -> dict[int, list[int]]:
    """Each layer's `count` most routed experts in a trace, most routed first (ties: lower id first; experts
    the trace never routes to fill the rest in id order)."""
    routed = {layer: Counter() for layer in layers}
    for row in rows:
        if row.layer in routed:
            routed[row.layer].update(row.experts)
    return {layer: sorted(range(num_experts), key=lambda e: (-c[e], e))[:count] for layer, c in routed.items()}


ADAPT_EVERY = 32  # model calls between re-placements when no trace says which experts are hot


def measure_host_expert(store: HostStore, e: ExpertSpec, hidden: int, dtype: torch.dtype, repeats: int = 5) -> float:
    """Median seconds of one decode token through one expert on the host, computed as the host worker computes
    it: the planner's CPU expert throughput (an upper bound: a layer's cold experts share one native call)."""
    weights = prepared(store.view(next(iter(store.blobs.values()))))
    x = torch.randn(1, hidden, generator=torch.Generator().manual_seed(0)).to(dtype)
    times = []
    for _ in range(repeats + 1):  # the first call also warms the kernels up
        start = time.perf_counter()
        run_on_host(torch.get_num_threads(), x, [weights], [1], e, torch.Size([1, 1]))
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


class SplitExperts:
    """`hot`: layer -> the experts its device slots hold at first (default: the first `capacity`);
    `adapt_every`: every that many model calls, re-place each layer's slots on the experts routed to most so
    far (0: never). On a CPU device a slot is its expert's host blob (alias), as in OffloadedExperts."""

    def __init__(self, store: HostStore, moe_layers: list[int], capacity: int, device: torch.device,
                 hot: dict[int, list[int]] | None = None, adapt_every: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"the split placement needs at least one device slot per layer, got {capacity}")
        self.store, self.device, self.adapt_every = store, device, adapt_every
        self.alias = device.type == "cpu"
        self.memory = {layer: torch.empty(0 if self.alias else capacity, store.blob_bytes, dtype=torch.uint8,
                                          device=device) for layer in moe_layers}
        self.slots: dict[int, list[int | None]] = {layer: [None] * capacity for layer in moe_layers}
        self.on_device: dict[int, dict[int, ExpertWeights]] = {layer: {} for layer in moe_layers}
        self.host_views: dict[tuple[int, int], ExpertWeights] = {}
        self.routed: dict[int, Counter] = {layer: Counter() for layer in moe_layers}
        self.counters = EngineStats()
        self.calls = 0
        for layer in moe_layers:
            wanted = (hot or {}).get(layer, range(capacity))
            for slot, expert in enumerate(list(wanted)[:capacity]):
                self._place(layer, slot, expert)

    def _place(self, layer: int, slot: int, expert: int) -> None:
        """Put `expert` in `slot` (a synchronous copy: placement changes only between model calls). The slot's
        previous expert leaves the device side before its bytes are overwritten."""
        previous = self.slots[layer][slot]
        if previous is not None:
            del self.on_device[layer][previous]
        self.slots[layer][slot] = None
        blob = self.store.blobs[layer, expert]
        if self.alias:
            weights = self.store.view(blob)
        else:
            self.memory[layer][slot, : blob.numel()].copy_(blob)
            weights = self.store.view(self.memory[layer][slot])
            self.counters.layers[layer].bytes_copied += blob.numel()
        self.on_device[layer][expert] = prepared(weights)
        self.slots[layer][slot] = expert

    def rebalance(self) -> None:
        """Each layer's slots onto its most routed experts so far (ties keep the experts already there)."""
        for layer, slots in self.slots.items():
            count = self.routed[layer]
            ranked = sorted(set(count) | set(self.on_device[layer]),
                            key=lambda e: (-count[e], e not in self.on_device[layer], e))
            wanted = ranked[: len(slots)]
            incoming = [e for e in wanted if e not in self.on_device[layer]]
            for slot, expert in enumerate(slots):
                if incoming and expert not in wanted:
                    self._place(layer, slot, incoming.pop(0))

    @contextmanager
    def call(self) -> Iterator[None]:
        """One model call; the placement may change only here, before the call starts."""
        self.calls += 1
        if self.adapt_every and self.calls % self.adapt_every == 0:
            self.rebalance()
        yield

    def provide(self, layer: int, experts: list[int], weights: list[float], tokens: list[int],
                prefetch: list[tuple[int, list[int]]]) -> Iterator[list[tuple[int, ExpertWeights]]]:
        """The cold experts first, as a HostBatch (computed on the host worker), then the device's."""
        self.store.check()
        device, stats = self.on_device[layer], self.counters.layers[layer]
        self.routed[layer].update(dict(zip(experts, tokens)))
        cold = HostBatch((e, self._host_weights(layer, e)) for e in experts if e not in device)
        hot = [(e, device[e]) for e in experts if e in device]
        stats.hits += len(hot)
        stats.misses += len(cold)
        self.counters.cpu_computed += len(cold)
        if cold:
            yield cold
        if hot:
            yield hot

    def _host_weights(self, layer: int, expert: int) -> ExpertWeights:
        """The expert's host blob, parsed and prepared for the CPU kernels once (host blobs never change)."""
        views = self.host_views.get((layer, expert))
        if views is None:
            views = self.host_views[layer, expert] = prepared(self.store.view(self.store.blobs[layer, expert]))
        return views

    def prefetch(self, predictions: list, count: int) -> None:
        """Nothing to prefetch: no expert moves during a call."""

    def stats(self) -> dict:
        return self.counters.summary(0.0) | {"placement": "split",
                                             "hot_experts": {layer: sorted(d) for layer, d in self.on_device.items()}}
