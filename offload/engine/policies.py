"""Eviction policies for a per-layer expert cache, and Belady's offline optimum.

A cache of k device slots for one MoE layer asks its policy which resident expert to
drop when a missed expert must come in. The cache (engine or simulator) drives the
policy through the hooks below; one policy instance serves one layer, so per-layer
routing statistics stay separate. Register your own with `register_policy`.

A policy that learns routing statistics can keep them across sequences: `on_new_sequence` marks a
cold cache (a new sequence in a trace replay); per-sequence state is reset there, learned state kept.
A policy may also read the routing of every layer (`reads_history`): the driver then `attach`es one
RoutingHistory, shared by all layers' policies, and records each router decision in it before the
layer's policy observes it.

Call order per router decision (step) of the layer:
    observe_routing(step, experts, weights)           # the router's choice, best first
    for each selected expert e:
        miss and full -> v = choose_victim(candidates); on_evict(v)
        miss          -> on_insert(e)
        always        -> on_access(e, step)
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .routing_history import RoutingHistory


class EvictionPolicy(ABC):
    """Chooses the victim among resident experts of one layer's cache.

    Hooks default to no-ops so a policy overrides only what it uses. Steps are
    non-decreasing integers, one per router decision of this layer.
    """

    reads_history = False
    """True for a policy that reads every layer's routing: only then is a RoutingHistory kept and attached."""

    def attach(self, history: RoutingHistory, layer: int) -> None:
        """The model-wide routing record, and which of its layers this policy serves."""

    def observe_routing(self, step: int, experts: Sequence[int], weights: Sequence[float]) -> None:
        """The router's selection for this step, before any of it is accessed."""

    def on_new_sequence(self) -> None:
        """The cache starts cold (a new sequence); steps restart from 0."""

    def on_access(self, expert: int, step: int) -> None:
        """`expert` is used at `step` (hit, or just inserted after a miss)."""

    def on_insert(self, expert: int) -> None:
        """`expert` became resident."""

    def on_evict(self, expert: int) -> None:
        """`expert` left the cache."""

    @abstractmethod
    def choose_victim(self, candidates: Sequence[int]) -> int:
        """Return one of `candidates`: resident experts that are not in use right now."""


class _Recency:
    """Monotone access stamps: exact recency even for several accesses per step."""

    def __init__(self) -> None:
        self._clock = 0
        self.stamp: dict[int, int] = {}

    def touch(self, expert: int) -> None:
        self._clock += 1
        self.stamp[expert] = self._clock


class LRUPolicy(EvictionPolicy):
    """Evict the least recently used expert: the baseline every policy must beat."""

    def __init__(self) -> None:
        self._recency = _Recency()

    def on_access(self, expert: int, step: int) -> None:
        self._recency.touch(expert)

    def choose_victim(self, candidates: Sequence[int]) -> int:
        return min(candidates, key=lambda e: self._recency.stamp.get(e, 0))


class LFUPolicy(EvictionPolicy):
    """Evict the least frequently used expert; counts survive eviction, ties go to LRU.

    Keeping counts of evicted experts is cheap (a layer has few experts) and stops a
    popular expert from looking cold after one eviction.
    """

    def __init__(self) -> None:
        self._count: defaultdict[int, int] = defaultdict(int)
        self._recency = _Recency()

    def on_access(self, expert: int, step: int) -> None:
        self._count[expert] += 1
        self._recency.touch(expert)

    def choose_victim(self, candidates: Sequence[int]) -> int:
        return min(candidates, key=lambda e: (self._count[e], self._recency.stamp.get(e, 0)))


class _DecayedCounts:
    """Per-expert counts that decay by `decay` per step, updated lazily in O(1)."""

    def __init__(self, decay: float) -> None:
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self.decay = decay
        self._value: dict[int, tuple[float, int]] = {}
        self._total = (0.0, 0)

    def _aged(self, value: float, since: int, step: int) -> float:
        return value * self.decay ** (step - since)

    def add(self, expert: int, step: int, amount: float = 1.0) -> None:
        v, t = self._value.get(expert, (0.0, step))
        self._value[expert] = (self._aged(v, t, step) + amount, step)
        tv, tt = self._total
        self._total = (self._aged(tv, tt, step) + amount, step)

    def get(self, expert: int, step: int) -> float:
        v, t = self._value.get(expert, (0.0, step))
        return self._aged(v, t, step)

    def share(self, expert: int, step: int) -> float:
        """This expert's fraction of all recent uses (0 before any use)."""
        tv, tt = self._total
        total = self._aged(tv, tt, step)
        return self.get(expert, step) / total if total > 0 else 0.0


class LFUAgingPolicy(EvictionPolicy):
    """LFU whose counts decay by `decay` per step (half-life ~ln 2/(1-decay) steps).

    Routing popularity drifts within a generation; aging lets the cache follow it.
    decay=0.95 (half-life ~14 steps) was chosen by cross-validation between the two
    real Mixtral traces (docs/cache_policies.md).
    """

    def __init__(self, decay: float = 0.95) -> None:
        self._freq = _DecayedCounts(decay)
        self._recency = _Recency()
        self._step = 0

    def on_access(self, expert: int, step: int) -> None:
        self._step = step
        self._freq.add(expert, step)
        self._recency.touch(expert)

    def choose_victim(self, candidates: Sequence[int]) -> int:
        return min(candidates,
                   key=lambda e: (self._freq.get(e, self._step), self._recency.stamp.get(e, 0)))


class NextUsePolicy(EvictionPolicy):
    """Evicts the candidate it rates least likely to be routed to soon (`next_use`); ties go to LRU.
    Its estimate is what LookupPolicy corrects."""

    def __init__(self) -> None:
        self._recency = _Recency()

    @abstractmethod
    def next_use(self, expert: int) -> float:
        """How likely `expert` is to be routed to soon, on a scale shared by all experts of the layer."""

    def last_used(self, expert: int) -> int:
        """Recency stamp of `expert` (0: never used)."""
        return self._recency.stamp.get(expert, 0)

    def on_access(self, expert: int, step: int) -> None:
        self._recency.touch(expert)

    def choose_victim(self, candidates: Sequence[int]) -> int:
        return min(candidates, key=lambda e: (self.next_use(e), self.last_used(e)))


class AffinityPolicy(NextUsePolicy):
    """Evict the expert least likely to be routed to at the next step.

    The estimate blends two signals learned online for this layer: the decayed share
    of recent routing (frequency with aging), and expert-to-expert transitions between
    successive steps (which experts follow the ones the router chose now; consecutive
    tokens route alike). The transition estimate for a pair seen rarely is pulled
    towards the frequency share by `prior` pseudo-counts. Ties go to LRU.
    """

    def __init__(self, decay: float = 0.9, mix: float = 0.5, prior: float = 2.0) -> None:
        if not 0.0 <= mix <= 1.0 or prior <= 0.0:
            raise ValueError(f"need 0 <= mix <= 1 and prior > 0, got mix={mix}, prior={prior}")
        super().__init__()
        self.mix, self.prior = mix, prior
        self._freq = _DecayedCounts(decay)
        self._follow: defaultdict[int, defaultdict[int, float]] = defaultdict(lambda: defaultdict(float))
        self._seen: defaultdict[int, float] = defaultdict(float)
        self._current: tuple[int, ...] = ()
        self._step = 0

    def observe_routing(self, step: int, experts: Sequence[int], weights: Sequence[float]) -> None:
        for a in self._current:
            self._seen[a] += 1
            for b in experts:
                self._follow[a][b] += 1
        for e in experts:
            self._freq.add(e, step)
        self._current, self._step = tuple(experts), step

    def next_use(self, expert: int) -> float:
        base = self._freq.share(expert, self._step) * len(self._current)
        if not self._current:
            return base
        follow = sum((self._follow[a][expert] + self.prior * base) / (self._seen[a] + self.prior)
                     for a in self._current) / len(self._current)
        return self.mix * follow + (1.0 - self.mix) * base


class LookupPolicy(EvictionPolicy):
    """A next-use estimate (`base`: affinity or context), corrected by what followed the earlier tokens
    that routed like the current one.

    Prompt-lookup decoding in routing space (RoutingHistory): the earlier tokens whose routing over all
    layers, at the previous token and at the layers passed so far, matches the current token's vote, by
    similarity**`sharpness`, for the experts this layer routed to in the `horizon` tokens after them.
    The vote replaces the base estimate in proportion to the best match's similarity, so repeated text
    is followed closely and new text falls back to the base. Without an attached history (a
    single-layer driver) it is the base policy.
    """

    reads_history = True

    def __init__(self, base: str = "affinity", horizon: int = 2, sharpness: float = 4.0, **base_kw: Any) -> None:
        if horizon < 1 or sharpness <= 0.0:
            raise ValueError(f"need horizon >= 1 and sharpness > 0, got horizon={horizon}, sharpness={sharpness}")
        self.base = make_policy(base, **base_kw)
        if not isinstance(self.base, NextUsePolicy):
            raise ValueError(f"lookup needs a base policy that estimates next use (affinity, context), got {base!r}")
        self.horizon, self.sharpness = horizon, sharpness
        self._history: RoutingHistory | None = None
        self._layer = 0

    def attach(self, history: RoutingHistory, layer: int) -> None:
        self._history, self._layer = history, layer

    def observe_routing(self, step: int, experts: Sequence[int], weights: Sequence[float]) -> None:
        self.base.observe_routing(step, experts, weights)

    def on_new_sequence(self) -> None:
        self.base.on_new_sequence()

    def on_access(self, expert: int, step: int) -> None:
        self.base.on_access(expert, step)

    def on_insert(self, expert: int) -> None:
        self.base.on_insert(expert)

    def on_evict(self, expert: int) -> None:
        self.base.on_evict(expert)

    def choose_victim(self, candidates: Sequence[int]) -> int:
        if self._history is None:
            return self.base.choose_victim(candidates)
        confidence, votes = self._history.continuation(self._layer, candidates, self.horizon, self.sharpness)
        score = {e: (1.0 - confidence) * self.base.next_use(e) + confidence * v for e, v in zip(candidates, votes)}
        return min(candidates, key=lambda e: (score[e], self.base.last_used(e)))


class ContextPolicy(NextUsePolicy):
    """Evict the expert least likely to be routed to within the next `horizon` steps, given the context.

    The context is the layer's last two router decisions (the set chosen now and the set chosen before);
    the estimate backs off from that pair of sets, to the current set alone, to each current expert's own
    transitions, to the decayed routing share, each level pulled towards the next by pseudo-counts
    (`prior`). Mixtral's routing depends on which experts were chosen *together*, which per-expert
    transitions (AffinityPolicy) average away; pair-of-sets contexts are sparse, so the counts outlive a
    sequence (`on_new_sequence` resets only the per-sequence state) and pay off once the layer has seen
    a few hundred decisions, e.g. from earlier requests or a recorded trace (`warm`).
    """

    def __init__(self, horizon: int = 2, prior: float = 2.0, decay: float = 0.9) -> None:
        if horizon < 1 or prior <= 0.0:
            raise ValueError(f"need horizon >= 1 and prior > 0, got horizon={horizon}, prior={prior}")
        super().__init__()
        self.horizon, self.prior, self.decay = horizon, prior, decay
        self._hits: defaultdict[tuple, defaultdict[int, float]] = defaultdict(lambda: defaultdict(float))
        self._seen: defaultdict[tuple, float] = defaultdict(float)
        self.on_new_sequence()

    def on_new_sequence(self) -> None:
        self._freq = _DecayedCounts(self.decay)
        self._recency = _Recency()
        self._pending: list[tuple[list[tuple], set[int]]] = []  # contexts still collecting their future
        self._current: tuple[int, ...] = ()
        self._contexts_now: list[tuple] = []  # this step's contexts: per expert, the set, the pair of sets
        self._step = 0

    @staticmethod
    def _contexts(current: Sequence[int], previous: Sequence[int]) -> list[tuple]:
        now = frozenset(current)
        return [*(("expert", a) for a in current), ("set", now), ("pair", now, frozenset(previous))]

    def observe_routing(self, step: int, experts: Sequence[int], weights: Sequence[float]) -> None:
        for _, future in self._pending:
            future.update(experts)
        while len(self._pending) >= self.horizon:
            contexts, future = self._pending.pop(0)
            for c in contexts:
                self._seen[c] += 1
                for e in future:
                    self._hits[c][e] += 1
        self._contexts_now = self._contexts(experts, self._current)
        self._current, self._step = tuple(experts), step
        self._pending.append((self._contexts_now, set()))
        for e in experts:
            self._freq.add(e, step)

    def _estimate(self, context: tuple, expert: int, fallback: float) -> float:
        return (self._hits[context][expert] + self.prior * fallback) / (self._seen[context] + self.prior)

    def next_use(self, expert: int) -> float:
        share = self._freq.share(expert, self._step) * len(self._current)
        if not self._current:
            return share
        *singles, whole, pair = self._contexts_now
        single = sum(self._estimate(c, expert, share) for c in singles) / len(singles)
        return self._estimate(pair, expert, self._estimate(whole, expert, single))


def warm(policy: EvictionPolicy, sequences: Iterable[Sequence[Sequence[int]]]) -> EvictionPolicy:
    """Feed earlier routing of this layer (one list of router decisions per sequence) to `policy` as a
    deployed engine would have seen it, then leave it ready for a cold cache. Returns the policy."""
    for decisions in sequences:
        policy.on_new_sequence()
        for step, experts in enumerate(decisions):
            policy.observe_routing(step, experts, [])
    policy.on_new_sequence()
    return policy


_REGISTRY: dict[str, Callable[..., EvictionPolicy]] = {}
POLICIES: list[str] = []
"""Names accepted by make_policy, in registration order."""


def register_policy(name: str, factory: Callable[..., EvictionPolicy]) -> None:
    """Make `factory(**kw)` available as make_policy(name, **kw) and in the benchmarks."""
    if name in _REGISTRY:
        raise ValueError(f"eviction policy {name!r} is already registered")
    _REGISTRY[name] = factory
    POLICIES.append(name)


def make_policy(name: str, **kw: Any) -> EvictionPolicy:
    """A fresh policy instance (one per layer); keyword arguments go to its constructor."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r}; choose from {', '.join(POLICIES)}") from None
    return factory(**kw)


register_policy("lru", LRUPolicy)
register_policy("lfu", LFUPolicy)
register_policy("lfu-aging", LFUAgingPolicy)
register_policy("affinity", AffinityPolicy)
register_policy("context", ContextPolicy)
register_policy("lookup", LookupPolicy)
register_policy("lookup-context", functools.partial(LookupPolicy, base="context"))


def belady_misses(accesses: Sequence[int], capacity: int) -> int:
    """Misses of Belady's MIN (evict the expert used furthest in the future).

    Offline: it needs the whole access sequence, so it is the ceiling online policies
    are measured against, not a policy.
    """
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    next_use: list[float] = [math.inf] * len(accesses)
    upcoming: dict[int, int] = {}
    for i in range(len(accesses) - 1, -1, -1):
        next_use[i] = upcoming.get(accesses[i], math.inf)
        upcoming[accesses[i]] = i
    resident: dict[int, float] = {}
    misses = 0
    for i, e in enumerate(accesses):
        if e not in resident:
            misses += 1
            if len(resident) >= capacity:
                del resident[max(resident, key=resident.__getitem__)]
        resident[e] = next_use[i]
    return misses


def belady_hit_rate(accesses: Sequence[int], capacity: int) -> float:
    """Best hit rate any demand-paged cache of `capacity` slots can reach on `accesses`."""
    return 1.0 - belady_misses(accesses, capacity) / len(accesses) if accesses else 0.0
