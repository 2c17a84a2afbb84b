"""Eviction policies and the cache simulator, on synthetic traces (no ../shared)."""

from __future__ import annotations

import json
import random
from collections import OrderedDict
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from offload.bench.cache_sim import app, run, simulate
from offload.engine import policies
from offload.engine.policies import (
    POLICIES,
    LRUPolicy,
    belady_hit_rate,
    belady_misses,
    make_policy,
    register_policy,
)
from offload.engine.routing_history import RoutingHistory
from offload.engine.trace import TraceRow, TraceWriter


def synthetic_rows(seed: int, seqs: int = 2, tokens: int = 40, layers: int = 3,
                   experts: int = 8, top_k: int = 2) -> list[TraceRow]:
    """Skewed, drifting routing so caches see both reuse and churn."""
    rng = random.Random(seed)
    rows = []
    for s in range(seqs):
        for t in range(tokens):
            for layer in range(layers):
                weights = [rng.random() ** 3 + (e == (t // 10 + layer) % experts) for e in range(experts)]
                chosen: list[int] = []
                while len(chosen) < top_k:
                    e = rng.choices(range(experts), weights)[0]
                    if e not in chosen:
                        chosen.append(e)
                rows.append(TraceRow(s, t, layer, tuple(chosen), (0.7, 0.3)[:top_k]))
    return sorted(rows, key=lambda r: r.key)


steps_strategy = st.lists(st.lists(st.integers(0, 7), min_size=1, max_size=3, unique=True), max_size=60)


def as_rows(steps: Sequence[Sequence[int]]) -> list[TraceRow]:
    return [TraceRow(0, t, 0, tuple(ex), tuple(1.0 / len(ex) for _ in ex)) for t, ex in enumerate(steps)]


@settings(max_examples=60, deadline=None)
@given(steps=steps_strategy, capacity=st.integers(1, 5))
def test_lru_matches_ordereddict_reference(steps: list[list[int]], capacity: int) -> None:
    """Drive LRUPolicy through the hooks; every victim must equal the reference's."""
    policy, ref = LRUPolicy(), OrderedDict[int, None]()
    hits = 0
    for t, row in enumerate(steps):
        for e in row:
            if e in ref:
                hits += 1
            else:
                if len(ref) >= capacity:
                    cands = [x for x in ref if x not in row] or list(ref)
                    expected = next(x for x in ref if x in cands)  # oldest first
                    assert policy.choose_victim(cands) == expected
                    del ref[expected]
                    policy.on_evict(expected)
                ref[e] = None
                policy.on_insert(e)
            ref.move_to_end(e)
            policy.on_access(e, t)
    assert simulate(as_rows(steps), "lru", capacity).hits == hits


def test_hit_counting_by_hand() -> None:
    # k=2: [1,2] miss miss | [1,3] hit, miss evicts 2 | [2,1] miss (evicts 3), hit
    r = simulate(as_rows([[1, 2], [1, 3], [2, 1]]), "lru", 2)
    assert (r.hits, r.misses, r.hit_rate) == (2, 4, pytest.approx(1 / 3))
    assert r.per_layer == {0: (2, 4)}


def test_cold_start_per_seq_and_per_layer_counts() -> None:
    rows = [TraceRow(s, 0, layer, (1, 2), (0.5, 0.5)) for s in (0, 1) for layer in (0, 1)]
    r = simulate(rows, "lru", 4)
    assert r.hits == 0 and r.per_layer == {0: (0, 4), 1: (0, 4)}


class Tracking(policies.EvictionPolicy):
    """Wraps a real policy and checks the simulator keeps the cache contract."""

    def __init__(self, inner: str, slots: int) -> None:
        self.inner, self.capacity = make_policy(inner), slots
        self.resident: set[int] = set()
        self.current: tuple[int, ...] = ()

    @property
    def reads_history(self) -> bool:
        return self.inner.reads_history

    def attach(self, history: RoutingHistory, layer: int) -> None:
        self.inner.attach(history, layer)

    def observe_routing(self, step: int, experts: Sequence[int], weights: Sequence[float]) -> None:
        self.current = tuple(experts)
        self.inner.observe_routing(step, experts, weights)

    def on_access(self, expert: int, step: int) -> None:
        assert expert in self.resident
        self.inner.on_access(expert, step)

    def on_insert(self, expert: int) -> None:
        self.resident.add(expert)
        assert len(self.resident) <= self.capacity
        self.inner.on_insert(expert)

    def on_evict(self, expert: int) -> None:
        self.resident.remove(expert)
        self.inner.on_evict(expert)

    def choose_victim(self, candidates: Sequence[int]) -> int:
        assert set(candidates) <= self.resident and len(self.resident) == self.capacity
        busy = set(self.current)
        if not self.resident <= busy:  # a free candidate exists: in-use experts are spared
            assert not busy & set(candidates)
        return self.inner.choose_victim(candidates)


@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize("capacity", [1, 2, 3, 5])
def test_never_more_than_k_residents(monkeypatch: pytest.MonkeyPatch, name: str, capacity: int) -> None:
    monkeypatch.setitem(policies._REGISTRY, "tracking", Tracking)
    rows = synthetic_rows(seed=capacity, top_k=3)
    assert simulate(rows, "tracking", capacity, inner=name, slots=capacity).hits == \
        simulate(rows, name, capacity).hits


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), capacity=st.integers(1, 7))
def test_belady_is_the_ceiling(seed: int, capacity: int) -> None:
    rows = synthetic_rows(seed, seqs=1, tokens=30, layers=2)
    best = simulate(rows, "belady", capacity).hits
    for name in POLICIES:
        assert simulate(rows, name, capacity).hits <= best


def brute_force_misses(accesses: Sequence[int], capacity: int) -> int:
    """Fewest misses over every demand-paging eviction choice."""
    def go(i: int, cache: frozenset[int]) -> int:
        if i == len(accesses):
            return 0
        e = accesses[i]
        if e in cache:
            return go(i + 1, cache)
        if len(cache) < capacity:
            return 1 + go(i + 1, cache | {e})
        return 1 + min(go(i + 1, (cache - {v}) | {e}) for v in cache)
    return go(0, frozenset())


@settings(max_examples=80, deadline=None)
@given(accesses=st.lists(st.integers(0, 4), max_size=10), capacity=st.integers(1, 3))
def test_belady_equals_brute_force(accesses: list[int], capacity: int) -> None:
    assert belady_misses(accesses, capacity) == brute_force_misses(accesses, capacity)


def test_belady_hit_rate_edges() -> None:
    assert belady_hit_rate([], 2) == 0.0
    assert belady_hit_rate([1, 2, 1, 2], 2) == 0.5
    with pytest.raises(ValueError):
        belady_misses([1], 0)


def test_lfu_and_aging_prefer_frequent_experts() -> None:
    for name in ("lfu", "lfu-aging"):
        p = make_policy(name)
        for t, e in enumerate([1, 1, 1, 2, 3]):
            p.on_access(e, t)
        assert p.choose_victim([1, 2]) == 2  # 2 is less frequent though more recent
    aging = make_policy("lfu-aging", decay=0.5)  # an old burst fades
    for t, e in enumerate([1, 1, 1] + [2] * 6):
        aging.on_access(e, t)
    assert aging.choose_victim([1, 2]) == 1


def test_affinity_learns_which_expert_follows() -> None:
    p = make_policy("affinity")
    for t in range(20):  # 5 always follows 1; 6 is twice as frequent but never follows 1
        experts = [(1,), (5,), (6,), (6,)][t % 4]
        p.observe_routing(t, experts, [1.0])
    p.observe_routing(20, (1,), [1.0])
    assert p.choose_victim([5, 6]) == 6


def test_registry() -> None:
    assert {"lru", "lfu", "lfu-aging", "affinity"} <= set(POLICIES)
    assert "belady" not in POLICIES  # offline: separate API
    with pytest.raises(ValueError, match="unknown eviction policy 'nope'; choose from lru"):
        make_policy("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_policy("lru", LRUPolicy)


def test_policy_returning_a_non_candidate_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    class Bad(LRUPolicy):
        def choose_victim(self, candidates: Sequence[int]) -> int:
            return -1
    monkeypatch.setitem(policies._REGISTRY, "bad", Bad)
    with pytest.raises(ValueError, match="chose -1"):
        simulate(as_rows([[1], [2], [3]]), "bad", 1)


def write_trace(path, rows: list[TraceRow]) -> str:
    with TraceWriter(path) as w:
        for r in rows:
            w.write(r.seq, r.token, r.layer, r.experts, r.probs)
    return str(path)


def test_run_reports_every_policy_and_belady(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    a = write_trace(tmp_path / "a.jsonl", synthetic_rows(1))
    b = write_trace(tmp_path / "b.jsonl", synthetic_rows(2))
    result = run([a, b], "all", 3, json_out=True)
    assert json.loads(capsys.readouterr().out) == result
    assert list(result["total"]) == [*POLICIES, "belady"]
    for name, entry in result["total"].items():
        parts = [result["files"][f][name] for f in (a, b)]
        assert entry["hits"] == sum(p["hits"] for p in parts)
        assert entry["hit_rate"] <= result["total"]["belady"]["hit_rate"]


def test_cli_table_and_errors(tmp_path) -> None:
    path = write_trace(tmp_path / "t.jsonl", synthetic_rows(3))
    runner = CliRunner()
    out = runner.invoke(app, ["--trace", path, "--policy", "lru", "--capacity", "2"])
    assert out.exit_code == 0, out.output
    assert "lru" in out.output and "belady" in out.output and "lfu" not in out.output
    out = runner.invoke(app, ["--trace", path, "--policy", "nope"])
    assert out.exit_code != 0 and "unknown eviction policy" in out.output


def test_context_tells_apart_what_per_expert_transitions_average_away() -> None:
    """After 3 then 1 comes 5; after 4 then 1 comes 6: from expert 1 alone both follow half the time."""
    pattern = [(3,), (1,), (5,), (4,), (1,), (6,)] * 20
    context = policies.warm(make_policy("context"), [pattern])
    affinity = policies.warm(make_policy("affinity"), [pattern])
    for before, keep, drop in (((3,), 5, 6), ((4,), 6, 5)):
        for p in (context, affinity):
            p.on_new_sequence()
            p.observe_routing(0, before, [1.0])
            p.observe_routing(1, (1,), [1.0])
        assert context.choose_victim([keep, drop]) == drop
    assert {affinity.choose_victim([5, 6]) for _ in range(2)} <= {5, 6}  # no information to tell them apart


def test_profile_warms_policies_on_other_files_only(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    # a cycle of 5 experts through 4 slots: LRU always evicts the next one; a learned context need not
    rows = lambda seq, n: [TraceRow(seq, t, 0, (t % 5 + 1,), (1.0,)) for t in range(n)]  # noqa: E731
    a, b = write_trace(tmp_path / "a.jsonl", rows(0, 15)), write_trace(tmp_path / "b.jsonl", rows(1, 100))
    cold = simulate(rows(0, 15), "context", 4)
    warmed = simulate(rows(0, 15), "context", 4, profile_rows=rows(1, 100))
    assert simulate(rows(0, 15), "lru", 4).hits == 0
    assert warmed.hit_rate > cold.hit_rate
    result = run([a, b], "context", 4, json_out=True, profile="others")
    capsys.readouterr()
    assert result["profile"] == "others"
    assert result["files"][a]["context"]["hits"] == warmed.hits  # a is warmed on b, never on itself
    with pytest.raises(ValueError, match="at least two"):
        run([a], "context", 4, profile="others")


class HistoryReference:
    """RoutingHistory's definition, spelled out over plain rows (layer -> expert set, None = unknown)."""

    def __init__(self, top_k: int, window: int) -> None:
        self.top_k, self.window = top_k, window
        self.rows: list[dict[int, frozenset[int] | None]] = []
        self.token: int | None = None

    def record(self, token: int, layer: int, experts: Sequence[int]) -> None:
        if self.token is None or token > self.token:
            if len(self.rows) == self.window:
                self.rows = self.rows[-(self.window // 2):]
            self.rows.append({})
            self.token = token
        row = self.rows[-1]
        row[layer] = None if layer in row or len(experts) > self.top_k else frozenset(experts)

    def continuation(self, layer: int, experts: Sequence[int], horizon: int, sharpness: float):
        rows, t = self.rows, len(self.rows) - 1
        weights, best = [], 0.0
        for s in range(1, t - 1):
            pairs = [(rows[s - 1], rows[t - 1]), (rows[s], rows[t])]
            known = [(a[c], b[c]) for a, b in pairs for c in set(a) & set(b) if a[c] is not None and b[c] is not None]
            similarity = sum(x == y for x, y in known) / len(known) if known else 0.0
            after = [rows[s + h].get(layer) for h in range(1, horizon + 1) if s + h < t]
            after = [a for a in after if a is not None]
            if after:
                weights.append((similarity ** sharpness, after))
                best = max(best, similarity)
        total = sum(w for w, _ in weights)
        if total <= 0:
            return 0.0, [0.0] * len(experts)
        return best, [sum(w * sum(e in a for a in after) for w, after in weights) / (total * horizon)
                      for e in experts]


decisions = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2), st.lists(st.integers(0, 5), min_size=1,
                                                                              max_size=3, unique=True)),
                     min_size=1, max_size=80)


@settings(max_examples=60, deadline=None)
@given(decisions=decisions, window=st.integers(4, 12), horizon=st.integers(1, 3),
       sharpness=st.sampled_from([1.0, 4.0]))
def test_routing_history_matches_its_definition(decisions, window, horizon, sharpness) -> None:
    """Token gaps, missing and repeated cells, decisions wider than top-k, and the window's trimming:
    the incremental similarities give exactly what the definition computes from scratch."""
    history, reference = RoutingHistory([0, 1, 2], top_k=2, window=window), HistoryReference(2, window)
    token = 0
    for step, layer, experts in decisions:
        token += step
        history.record(token, layer, experts)
        reference.record(token, layer, experts)
        for query in range(3):
            got = history.continuation(query, [0, 1, 2, 3, 4, 5], horizon, sharpness)
            want = reference.continuation(query, [0, 1, 2, 3, 4, 5], horizon, sharpness)
            assert got[0] == pytest.approx(want[0]) and got[1] == pytest.approx(want[1])
    assert history.tokens == len(reference.rows)
    for back in range(len(reference.rows)):
        for layer in range(3):
            cell = reference.rows[-1 - back].get(layer)
            assert (None if cell is None else frozenset(history.routed(back, layer))) == cell
    with pytest.raises(ValueError, match="must not decrease"):
        history.record(token - 1, 0, [1])


def repeated_text(seed: int, phrase: int = 12, repeats: int = 5, layers: int = 4) -> list[TraceRow]:
    """A phrase of tokens said again and again, as generated code repeats itself: each token routes the
    same way every time it comes (experts drawn at random per token and layer), with a random token
    between repeats."""
    rng = random.Random(seed)
    routing = {tok: [tuple(rng.sample(range(8), 2)) for _ in range(layers)] for tok in range(40)}
    words = rng.sample(range(30), phrase)
    text = [w for _ in range(repeats) for w in [*words, rng.randrange(30, 40)]]
    return [TraceRow(0, t, layer, routing[w][layer], (0.6, 0.4)) for t, w in enumerate(text) for layer in range(layers)]


@pytest.mark.parametrize("seed", range(4))
def test_lookup_gains_on_repeated_text_in_replay(seed: int) -> None:
    """The replay gives every layer's policy the seq's routing history: on repeated text the lookup beats
    the affinity estimate it falls back to (without the history it would equal it) and LRU."""
    rows = repeated_text(seed)
    lookup, affinity, lru = (simulate(rows, name, 4).hit_rate for name in ("lookup", "affinity", "lru"))
    assert lookup > affinity + 0.02 and lookup > lru + 0.05, (lookup, affinity, lru)


def test_lookup_tells_apart_by_the_other_layers() -> None:
    """Layer 0 routes A and B alike, and then X alike, yet X is followed by P after A and by Q after B.
    Only layer 1 (where A and B differ) tells which: the lookup keeps the right expert, layer-local
    estimates cannot tell the two cases apart."""
    route = {"A": (1, 2), "B": (1, 3), "X": (4, 4), "P": (5, 5), "Q": (6, 6), "F": (7, 7)}  # layer 0, layer 1
    text = "AXPFBXQF" * 5
    affinity_victims = set()
    for before, keep, drop in (("A", 5, 6), ("B", 6, 5)):
        history = RoutingHistory([0, 1], top_k=1)
        lookup, affinity = make_policy("lookup"), make_policy("affinity")
        lookup.attach(history, 0)
        for t, word in enumerate(text + before + "X"):
            history.record(t, 0, [route[word][0]])
            for p in (lookup, affinity):
                p.observe_routing(t, [route[word][0]], [1.0])
                p.on_access(route[word][0], t)
            if t < len(text) + 1:
                history.record(t, 1, [route[word][1]])
        assert lookup.choose_victim([keep, drop]) == drop
        affinity_victims.add(affinity.choose_victim([5, 6]))
    assert len(affinity_victims) == 1  # layer 0's own history is the same in both cases


def test_lookup_without_a_history_is_affinity() -> None:
    rows = synthetic_rows(seed=5, layers=1)
    steps = [r.experts for r in rows]
    lookup, affinity = make_policy("lookup"), make_policy("affinity")
    for t, experts in enumerate(steps):
        lookup.observe_routing(t, experts, [])
        affinity.observe_routing(t, experts, [])
        for e in experts:
            lookup.on_access(e, t)
            affinity.on_access(e, t)
        candidates = [e for e in range(8) if e not in experts]
        assert lookup.choose_victim(candidates) == affinity.choose_victim(candidates)
    with pytest.raises(ValueError, match="sharpness > 0"):
        make_policy("lookup", sharpness=0)
