"""Replay routing traces against expert-cache eviction policies (offline benchmark).

Each (seq, layer) is its own cache of `capacity` slots, cold at the start of a seq; each selected
expert of a router decision is one access; a miss always loads the expert (demand paging), evicting a
resident that the same decision does not use when there is one. Belady's offline optimum is reported
as the ceiling. A seq's rows are replayed in trace order, all layers interleaved as the engine meets
them, with one RoutingHistory (empty at each seq) that every layer's policy may read.

By default every (seq, layer) also gets a fresh policy. With a profile (other trace
files) each layer's policy first sees that routing (`policies.warm`), as an engine that
has served earlier requests would have; the cache itself still starts cold.
"""

from __future__ import annotations

import copy
import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from offload.bench.table import print_table
from offload.engine.policies import POLICIES, EvictionPolicy, belady_misses, make_policy, warm
from offload.engine.routing_history import RoutingHistory
from offload.engine.trace import TraceRow, read_trace

BELADY = "belady"


@dataclass(frozen=True)
class SimResult:
    """Hit/miss counts of one replay; per_layer maps layer -> (hits, misses)."""

    hits: int
    misses: int
    per_layer: dict[int, tuple[int, int]] = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


def _streams(rows: Iterable[TraceRow]) -> dict[tuple[int, int], list[TraceRow]]:
    """Rows per (seq, layer) in trace order: each is one cold cache's access stream."""
    streams: dict[tuple[int, int], list[TraceRow]] = defaultdict(list)
    for row in rows:
        streams[(row.seq, row.layer)].append(row)
    return streams


class _LayerCache:
    """One layer's cache in a replay: resident experts and the policy that picks victims."""

    def __init__(self, policy: EvictionPolicy, capacity: int) -> None:
        self.policy, self.capacity = policy, capacity
        self.resident: dict[int, None] = {}
        self.step = 0  # index of the router decision in this layer's stream

    def replay(self, row: TraceRow) -> int:
        """Serve one router decision; returns its hits."""
        policy, resident, step = self.policy, self.resident, self.step
        self.step += 1
        policy.observe_routing(step, row.experts, row.probs)
        hits = 0
        for expert in row.experts:
            if expert in resident:
                hits += 1
            else:
                if len(resident) >= self.capacity:
                    candidates = [e for e in resident if e not in row.experts] or list(resident)
                    victim = policy.choose_victim(candidates)
                    if victim not in candidates:
                        raise ValueError(f"{type(policy).__name__} chose {victim}, not one of {candidates}")
                    del resident[victim]
                    policy.on_evict(victim)
                resident[expert] = None
                policy.on_insert(expert)
            policy.on_access(expert, step)
        return hits


def _warmed(policy_name: str, profile_rows: Iterable[TraceRow], **kw: Any) -> dict[int, EvictionPolicy]:
    """One policy per layer that has seen the profile's routing of that layer."""
    by_layer: dict[int, list[list[list[int]]]] = defaultdict(list)
    for (_, layer), stream in _streams(profile_rows).items():
        by_layer[layer].append([row.experts for row in stream])
    return {layer: warm(make_policy(policy_name, **kw), seqs) for layer, seqs in by_layer.items()}


def simulate(trace_rows: Iterable[TraceRow], policy_name: str, capacity: int,
             profile_rows: Iterable[TraceRow] | None = None, **kw: Any) -> SimResult:
    """Replay rows against `policy_name` (a registered policy or "belady"); with `profile_rows`, every
    (seq, layer) starts from a copy of that layer's policy warmed on the profile."""
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    warmed = _warmed(policy_name, profile_rows, **kw) if profile_rows is not None and policy_name != BELADY else {}
    rows = list(trace_rows)
    hits: dict[int, int] = defaultdict(int)  # per layer
    accesses: dict[int, int] = defaultdict(int)
    for row in rows:
        accesses[row.layer] += len(row.experts)
    if policy_name == BELADY:
        for (_, layer), stream in _streams(rows).items():
            used = [e for r in stream for e in r.experts]
            hits[layer] += len(used) - belady_misses(used, capacity)
    else:  # every seq in trace order, all layers interleaved, as the engine meets them
        layers, top_k = sorted(accesses), max((len(r.experts) for r in rows), default=1)
        caches: dict[tuple[int, int], _LayerCache] = {}
        histories: dict[int, RoutingHistory] = {}
        for row in rows:
            cache = caches.get((row.seq, row.layer))
            if cache is None:
                policy = copy.deepcopy(warmed[row.layer]) if row.layer in warmed else make_policy(policy_name, **kw)
                if policy.reads_history:
                    if row.seq not in histories:
                        histories[row.seq] = RoutingHistory(layers, top_k)
                    policy.attach(histories[row.seq], row.layer)
                cache = caches[row.seq, row.layer] = _LayerCache(policy, capacity)
            if row.seq in histories:
                histories[row.seq].record(row.token, row.layer, row.experts)
            hits[row.layer] += cache.replay(row)
    per_layer = {layer: (hits[layer], accesses[layer] - hits[layer]) for layer in sorted(accesses)}
    return SimResult(sum(h for h, _ in per_layer.values()), sum(m for _, m in per_layer.values()), per_layer)


def _entry(hits: int, misses: int) -> dict[str, Any]:
    return {"hits": hits, "misses": misses, "hit_rate": round(hits / max(hits + misses, 1), 4)}


def run(trace: list[str], policy: str, capacity: int, json_out: bool = False, profile: str = "none") -> dict:
    """Hit rate of `policy` (or "all") and of Belady on each trace file and in total.

    profile: "none" (fresh policies), "others" (each file's policies are warmed on all the OTHER trace
    files given: leave-one-out, never on the file measured) or a path of a trace to warm on.

    Prints a table, or the returned dict as JSON when json_out is set:
    {"capacity": k, "files": {path: {policy: {hits, misses, hit_rate}}}, "total": {...}}.
    """
    if not trace:
        raise ValueError("give at least one trace file")
    names = [*POLICIES] if policy == "all" else [policy]
    if policy != "all":
        make_policy(policy)  # fail on an unknown name before reading any trace
    names.append(BELADY)
    if profile == "others" and len(trace) < 2:
        raise ValueError("--profile others needs at least two --trace files (each is warmed on the others)")
    files: dict[str, dict[str, Any]] = {}
    total: dict[str, list[int]] = {n: [0, 0] for n in names}
    traces = {path: read_trace(path) for path in trace}
    fixed_profile = None if profile in ("none", "others") else read_trace(profile)
    for path, rows in traces.items():
        if profile == "others":
            profile_rows = [row for other, r in traces.items() if other != path for row in r]
        else:
            profile_rows = fixed_profile
        files[path] = {}
        for name in names:
            r = simulate(rows, name, capacity, profile_rows)
            files[path][name] = _entry(r.hits, r.misses)
            total[name][0] += r.hits
            total[name][1] += r.misses
    result = {"capacity": capacity, "profile": profile, "files": files, "total": {n: _entry(*hm) for n, hm in total.items()}}
    if json_out:
        print(json.dumps(result, indent=2))
    else:
        _print_table(result)
    return result


def _print_table(result: dict) -> None:
    warmed = "" if result["profile"] == "none" else f", policies warmed on {result['profile']}"
    table = Table(title=f"hit rate, {result['capacity']} slots/layer{warmed} (belady: offline ceiling)")
    table.add_column("policy")
    columns = {Path(p).name: v for p, v in result["files"].items()}
    if len(columns) > 1:
        columns["total"] = result["total"]
    for col in columns:
        table.add_column(col, justify="right")
    for name in result["total"]:
        cells = [f"{columns[c][name]['hit_rate']:.3f}" for c in columns]
        table.add_row(name, *cells, style="dim" if name == BELADY else None)
    print_table(table)


app = typer.Typer(add_completion=False)


@app.command()
def cache_sim(
    trace: list[Path] = typer.Option(..., "--trace", exists=True, dir_okay=False, help="JSONL routing trace (repeatable)."),
    policy: str = typer.Option("all", "--policy", help=f"One of {', '.join(POLICIES)}, or all."),
    capacity: int = typer.Option(4, "--capacity", min=1, help="Expert slots per layer."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    profile: str = typer.Option("none", "--profile", help="Warm policies first: none, others (each file on the "
                                "other --trace files) or a trace file path."),
) -> None:
    """Replay expert-routing traces against cache eviction policies: hit rate per policy, with Belady's
    optimum as the ceiling."""
    try:
        run([str(p) for p in trace], policy, capacity, json_out, profile)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


if __name__ == "__main__":
    app()
