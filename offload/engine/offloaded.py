"""The offload engine as an ExpertProvider: experts live in the host tier, `capacity` of them per MoE
layer sit in preallocated device slots; misses are copied in on the copier lane, predicted experts of
later layers are prefetched behind the current layer's compute, and outputs never change.

A call may stop anywhere (Ctrl-C raises KeyboardInterrupt between any two bytecodes): `holds`, what each slot's
bytes are once the copier lane drains, is only ever changed so that it stays true, and `call()` rebuilds the
rest of the bookkeeping from it (`recover`) after a call that did not finish."""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from offload.quant.pack import unpack_rows

from ..errors import OffloadError
from ..model.moe import top_experts
from ..quantize import prepared
from .cache import LayerSlots
from .copier import make_copier
from .planner import measure_bandwidth
from .policies import make_policy
from .routing_history import RoutingHistory
from .stats import EngineStats
from .store import ExpertWeights, HostStore


class OffloadedExperts:
    """placement "inclusive": the host keeps every expert, eviction is free. "exclusive": an expert lives
    either in a device slot or in the host (host RAM smaller than all experts); an evicted expert is
    written back to the host, a loaded one leaves it. alias (a CPU device, inclusive placement): a slot is its
    expert's host blob itself, not a copy of it: on a CPU the host memory is the device's, and a copy would only
    hold the cached experts twice; the slots keep their bookkeeping (policy, hits, prefetch) all the same."""

    def __init__(self, store: HostStore, moe_layers: list[int], capacity: int, device: torch.device,
                 policy: str = "lru", miss_policy: str = "load", placement: str = "inclusive",
                 top_k: int = 0, alias: bool = False) -> None:
        if placement not in ("inclusive", "exclusive"):
            raise ValueError(f"placement must be 'inclusive' or 'exclusive', got {placement!r}")
        if alias and (device.type != "cpu" or placement != "inclusive"):
            raise ValueError("alias=True needs a CPU device and inclusive placement (slots that are the host blobs)")
        self.alias = alias
        if miss_policy not in ("load", "cpu", "auto"):
            raise ValueError(f"miss_policy must be 'load', 'cpu' or 'auto', got {miss_policy!r}")
        self.store, self.device, self.top_k = store, device, top_k
        self.miss_policy, self.policy = miss_policy, policy
        self.host_bandwidth = self.copy_bandwidth = 0.0  # measured on first use by the "auto" cost model
        self.copier = make_copier(device)
        # layer -> per slot, the expert whose bytes the slot holds once the copier lane has drained (None: none)
        self.holds: dict[int, list[int | None]] = {layer: [None] * capacity for layer in moe_layers}
        self._start_bookkeeping()
        self.stale = False  # a call began and did not finish: the bookkeeping may not match the slots
        self.memory = {layer: torch.empty(0 if alias else capacity, store.blob_bytes, dtype=torch.uint8,
                                          device=device) for layer in moe_layers}
        # (layer, slot) -> views into the slot: every blob has one layout, so a slot's views never change (alias:
        # views into the blob the slot is, set as it is admitted)
        self.slot_views = {} if alias else {(layer, slot): store.view(self.memory[layer][slot])
                                            for layer in moe_layers for slot in range(capacity)}
        self.counters = EngineStats()
        self.exclusive = placement == "exclusive"
        if self.exclusive:  # start with the first experts of every layer on the device, the rest in the host
            for layer in moe_layers:
                for expert in range(capacity):
                    self._copy_in(layer, expert, *self.slots[layer].admit(expert, protected=()))
            self.sync()

    def _start_bookkeeping(self) -> None:
        """Slots as `holds` says, fresh policies (and routing history), nothing in flight."""
        self.slots = {layer: LayerSlots(len(holds), make_policy(self.policy), holds)
                      for layer, holds in self.holds.items()}
        self.history: RoutingHistory | None = None  # every layer's routing per token, kept only if a policy reads it
        if any(slots.policy.reads_history for slots in self.slots.values()):
            self.history = RoutingHistory(list(self.slots), max(self.top_k, 1))
            for layer, slots in self.slots.items():
                slots.policy.attach(self.history, layer)
        self._token, self._last_layer = 0, None  # history keys: a layer at or before the last starts a new token
        self.pending: dict[tuple[int, int], object] = {}  # copies submitted, not yet waited on
        self.ready: dict[tuple[int, int], ExpertWeights] = {}  # (layer, slot) -> compute-ready weights
        self.host_views: dict[tuple[int, int], ExpertWeights] = {}  # (layer, expert) -> views into its host blob
        self.homing: dict[tuple[int, int], object] = {}  # (layer, expert) -> its write-back, not yet waited on
        self.prefetched: set[tuple[int, int]] = set()  # loaded ahead and not used yet
        self.predicted: dict[int, set[int]] = {}

    @contextmanager
    def call(self) -> Iterator[None]:
        """One model call. A call that raises (Ctrl-C included) is rolled back at once; one stopped anywhere
        else, even inside that rollback, leaves `stale` set, and the next call rolls back first."""
        if self.stale:
            self.recover()
        self.stale = True
        try:
            yield
        except BaseException:
            self.recover()
            raise
        self.stale = False

    def recover(self) -> None:
        """Back to a consistent state after an unfinished call: let the copier lane drain, keep in each slot the
        expert `holds` names if its copy succeeded (once per layer), restart the bookkeeping from that, and
        (exclusive placement) drop the host copy of every expert a slot holds, so each lives in exactly one
        place. Safe to interrupt and run again."""
        self.copier.drain()
        for layer, holds in self.holds.items():
            for slot, expert in enumerate(holds):
                if expert is not None and (expert in holds[:slot] or not self._copied(layer, expert)):
                    holds[slot] = None
            if self.exclusive:
                for expert in holds:
                    self.store.blobs.pop((layer, expert), None)
        self._start_bookkeeping()
        self.stale = False

    def _copied(self, layer: int, expert: int) -> bool:
        """Whether the copy of `expert` into its slot, if one is still unwaited, succeeded (the lane is drained)."""
        handle = self.pending.get((layer, expert))
        try:
            if handle is not None:
                self.copier.wait(handle)
        except Exception:  # noqa: BLE001 - a failed copy: the slot holds nothing usable
            return False
        return True

    def provide(self, layer: int, experts: list[int], weights: list[float], tokens: list[int],
                prefetch: list[tuple[int, list[int]]]) -> Iterator[list[tuple[int, ExpertWeights]]]:
        self.store.check()  # a mapped expert file changed under us: stop before reading it
        slots, stats = self.slots[layer], self.counters.layers[layer]
        on_host = {e for e, n in zip(experts, tokens) if e not in slots.slot_of and self._compute_on_host(n)}
        order = [e for _, e in sorted(zip(weights, experts), key=lambda p: -p[0])]
        if sum(tokens) == self.top_k:  # one token: score the prediction made for it (recall per decoded token)
            self._score_prediction(layer, experts)
            if self.history is not None:
                self._record(layer, order)
        else:
            self.predicted.pop(layer, None)
        slots.observe(order, sorted(weights, reverse=True))
        hits = [e for e in experts if e in slots.slot_of]
        missing = [e for e in experts if e not in slots.slot_of and e not in on_host]
        stats.hits += len(hits)
        stats.misses += len(missing)
        for e in hits:
            slots.access(e)
            if (layer, e) in self.prefetched:
                self.prefetched.discard((layer, e))
                stats.prefetch_used += 1
        stats.misses += len(on_host)
        self.counters.cpu_computed += len(on_host)
        in_use = set(experts)
        loaded = self._load(layer, missing, in_use)
        for later, predicted in prefetch:
            self._prefetch(later, predicted)
        batch = [(e, self._host_weights(layer, e)) for e in sorted(on_host)]
        while True:
            batch += [(e, self._ready(layer, e)) for e in hits + loaded]
            yield batch
            in_use -= {e for e, _ in batch}  # the caller has finished with them: their slots may be reused
            if not missing:
                return
            hits, batch, loaded = [], [], self._load(layer, missing, in_use)
            if not loaded:
                raise OffloadError(f"layer {layer}: no expert slot can be freed; raise cache_experts")

    def slot_stacks(self, layer: int, experts: int) -> dict[str, torch.Tensor] | None:
        """The layer's slots as one tensor per weight ([capacity, ...], views of the slot memory), for routing
        that stays on the device (`moe_on_device` on slot ids: a decode step in CUDA graphs), when a step's
        `experts` distinct experts fit in the slots at once and every miss is copied in; else None (quantized
        weights, slots that are host blobs, misses computed on the host)."""
        if self.alias or self.miss_policy != "load" or len(self.holds[layer]) < experts:
            return None
        return unpack_rows(self.memory[layer], self.store.index)

    def place(self, layer: int, experts: list[int], weights: list[float], tokens: list[int],
              prefetch: list[tuple[int, list[int]]]) -> list[int]:
        """Put a step's experts in the layer's slots, counted, loaded and prefetched as `provide` does, and
        return their slots (for `slot_stacks`' rows)."""
        batches = self.provide(layer, experts, weights, tokens, prefetch)
        batch = next(batches)
        batches.close()
        if len(batch) != len(experts):
            raise OffloadError(f"layer {layer}: {len(experts)} experts do not fit in the slots at once; "
                               "raise cache_experts")
        return [self.slots[layer].slot_of[e] for e in experts]

    def prefetch(self, predictions: list[tuple[int, torch.Tensor]], count: int) -> None:
        """Prefetch from expert scores of later layers (predict_from="output"): one host sync."""
        if predictions:
            table = torch.stack([scores for _, scores in predictions]).tolist()
            for (layer, _), scores in zip(predictions, table):
                self._prefetch(layer, top_experts(scores, count))

    def _compute_on_host(self, tokens: int) -> bool:
        """Fiddler-style: run a missed expert where its weights are instead of copying them. On a CPU
        compute device a copy only costs (same memory, same cores); on a GPU the cost model compares
        copying the blob with reading it `tokens` times on the host."""
        if self.miss_policy != "auto":
            return self.miss_policy == "cpu"
        if self.device.type == "cpu":
            return True
        if not self.copy_bandwidth:
            self.host_bandwidth, self.copy_bandwidth = measure_bandwidth(self.device)
        return tokens * self.store.blob_bytes / self.host_bandwidth < self.store.blob_bytes / self.copy_bandwidth

    def _load(self, layer: int, missing: list[int], in_use: set[int]) -> list[int]:
        """Admit and start copying as many of `missing` as free or evictable slots allow (consumes them)."""
        slots, loaded = self.slots[layer], []
        while missing:
            placed = slots.admit(missing[0], protected=in_use)
            if placed is None:
                break
            expert = missing.pop(0)
            self._copy_in(layer, expert, *placed)
            slots.access(expert)
            loaded.append(expert)
        return loaded

    def _prefetch(self, layer: int, experts: list[int]) -> None:
        self.predicted[layer] = set(experts)
        slots, stats = self.slots[layer], self.counters.layers[layer]
        for expert in experts:
            if expert in slots.slot_of:
                continue
            placed = slots.admit(expert, protected=set(experts))
            if placed is None:
                return
            self._copy_in(layer, expert, *placed)
            self.prefetched.add((layer, expert))
            stats.prefetch_issued += 1

    def _copy_in(self, layer: int, expert: int, slot: int, evicted: int | None) -> None:
        """Start copying `expert` into `slot` (exclusive placement: after sending `evicted` home). The slot
        holds nothing usable from just before the copy is queued until it is recorded in `holds`."""
        holds = self.holds[layer]
        if self.exclusive and evicted is not None and (layer, evicted) not in self.pending:
            home = self.store.new_blob()  # (an unwaited copy-in left the expert's host blob in place)
            self.homing[layer, evicted] = self.copier.writeback(home, self.memory[layer][slot])
            self.store.blobs[layer, evicted] = home
            self.host_views.pop((layer, evicted), None)
        holds[slot] = None
        self.ready.pop((layer, slot), None)
        if evicted is not None:
            self.pending.pop((layer, evicted), None)
            if (layer, evicted) in self.prefetched:
                self.prefetched.discard((layer, evicted))
                self.counters.layers[layer].prefetch_wasted += 1
        blob = self.store.blobs[layer, expert]
        if self.alias:
            self.slot_views[layer, slot] = self.store.view(blob)
        else:
            self.pending[layer, expert] = self.copier.submit(self.memory[layer][slot, : blob.numel()], blob)
            self.counters.layers[layer].bytes_copied += blob.numel()
        holds[slot] = expert

    def _ready(self, layer: int, expert: int) -> ExpertWeights:
        """Wait for the expert's copy (if any) and return views into its slot."""
        handle = self.pending.get((layer, expert))
        if handle is not None:
            start = time.perf_counter()
            try:
                self.copier.wait(handle)
            except Exception as e:
                self.holds[layer][self.slots[layer].slot_of[expert]] = None
                self.slots[layer].drop(expert)
                self.prefetched.discard((layer, expert))
                del self.pending[layer, expert]
                raise OffloadError(f"copying expert {expert} of layer {layer} to {self.device} failed: {e}") from e
            self.counters.wait_seconds += time.perf_counter() - start
            del self.pending[layer, expert]
            if self.exclusive:
                del self.store.blobs[layer, expert]  # it lives on the device now
                self.host_views.pop((layer, expert), None)
        slot = self.slots[layer].slot_of[expert]
        if (layer, slot) not in self.ready:  # quantized weights are converted to the kernel's form once per load
            self.ready[layer, slot] = prepared(self.slot_views[layer, slot])
        return self.ready[layer, slot]

    def _host_weights(self, layer: int, expert: int) -> ExpertWeights:
        """The expert's host blob, parsed and prepared for the CPU kernels once per blob, for computing a miss
        where it lives (the parse costs ~0.1 ms, as much as a small expert's whole MLP; checking a raw weight's
        cached prepared form ~20 us a projection per call). Host blobs are replaced, never rewritten."""
        views = self.host_views.get((layer, expert))
        if views is None:
            homing = self.homing.pop((layer, expert), None)
            if homing is not None:  # written back on the copier lane: the host reads it only once it has landed
                self.copier.finish(homing)
            views = self.host_views[layer, expert] = prepared(self.store.view(self.store.blobs[layer, expert]))
        return views

    def _record(self, layer: int, experts: list[int]) -> None:
        """One token's routing at `layer` into the history (prefills and verify steps are not one token's)."""
        if self._last_layer is not None and layer <= self._last_layer:
            self._token += 1
        self._last_layer = layer
        self.history.record(self._token, layer, experts)

    def _score_prediction(self, layer: int, routed: list[int]) -> None:
        predicted = self.predicted.pop(layer, None)
        if predicted is None:
            return
        stats = self.counters.layers[layer]
        stats.predicted += len(predicted)
        stats.predicted_correct += len(predicted & set(routed))
        stats.routed += len(routed)

    def sync(self) -> None:
        """Wait for every copy in flight (tests and benchmarks; the hot path never needs it)."""
        for (layer, expert) in list(self.pending):
            self._ready(layer, expert)

    def stats(self) -> dict:
        return self.counters.summary(self.copier.busy_seconds)
