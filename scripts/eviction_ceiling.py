"""How far can any eviction rule built on a layer's routing history go on the Mixtral traces?

Fits a logistic model, per decision and candidate, of "this expert is routed to within the next `horizon`
steps" from every history signal the shipped policies use (recency, decayed routing shares at three
half-lives, the `affinity` and `context` estimates), then replays the traces evicting the candidate the
model rates least likely. Fitted on the very file it is replayed on, this bounds what a learned mix of
those signals can reach (cold cache per sequence, 4 of 8 slots); fitted on the other file, it is what
such a policy would really get. Usage:

    python scripts/eviction_ceiling.py ../shared/traces/mixtral-8x7b-instruct/humaneval.jsonl \
        ../shared/traces/mixtral-8x7b-instruct/humaneval-2.jsonl [--horizon 2]
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import torch

from offload.bench.cache_sim import _streams
from offload.engine.policies import EvictionPolicy, make_policy
from offload.engine.trace import read_trace

CAPACITY, N_EXPERTS = 4, 8
DECAYS = (0.5, 0.8, 0.95)


class History:
    """One layer's routing so far, with the shipped policies' estimates kept current."""

    def __init__(self) -> None:
        self.decisions: list[tuple[int, ...]] = []
        self.estimators: list[EvictionPolicy] = [make_policy("context"), make_policy("affinity")]

    def observe(self, experts: Sequence[int]) -> None:
        step = len(self.decisions)
        self.decisions.append(tuple(experts))
        for p in self.estimators:
            p.observe_routing(step, experts, [])

    def access(self, expert: int) -> None:
        for p in self.estimators:
            p.on_access(expert, len(self.decisions) - 1)

    def features(self, expert: int) -> list[float]:
        now = len(self.decisions) - 1
        gap = next((g for g in range(now + 1) if expert in self.decisions[now - g]), None)
        buckets = [float(gap == b) for b in (1, 2, 3, 4)] + [float(gap is not None and 5 <= gap < 10),
                                                           float(gap is None)]
        shares = []
        for d in DECAYS:
            weights = [d ** (now - i) for i in range(now + 1)]
            used = sum(w for w, dec in zip(weights, self.decisions) if expert in dec)
            shares.append(used / sum(weights))
        estimates = [p.next_use(expert) for p in self.estimators]
        return [*buckets, *shares, *estimates, 1.0]


def training_rows(streams: dict, horizon: int) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for stream in streams.values():
        decisions = [row.experts for row in stream]
        history = History()
        for step, experts in enumerate(decisions):
            history.observe(experts)
            future = {e for d in decisions[step + 1: step + 1 + horizon] for e in d}
            for e in range(N_EXPERTS):
                if e not in experts:
                    xs.append(history.features(e))
                    ys.append(float(e in future))
            for e in experts:
                history.access(e)
    return torch.tensor(xs), torch.tensor(ys)


def fit(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    w = torch.zeros(x.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200)

    def loss() -> torch.Tensor:
        opt.zero_grad()
        value = torch.nn.functional.binary_cross_entropy_with_logits(x @ w, y) + 1e-4 * w.square().sum()
        value.backward()
        return value

    opt.step(loss)
    return w.detach()


def replay(streams: dict, score: Callable[[History, int], float]) -> float:
    hits = accesses = 0
    for stream in streams.values():
        history, resident = History(), set()
        for row in stream:
            history.observe(row.experts)
            for e in row.experts:
                accesses += 1
                if e in resident:
                    hits += 1
                else:
                    if len(resident) >= CAPACITY:
                        candidates = [r for r in resident if r not in row.experts] or list(resident)
                        resident.remove(min(candidates, key=lambda r: score(history, r)))
                    resident.add(e)
                history.access(e)
    return hits / accesses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("traces", nargs=2, help="two routing trace files (JSONL)")
    parser.add_argument("--horizon", type=int, default=2, help="label: routed within this many steps")
    args = parser.parse_args()
    streams = [_streams(read_trace(path)) for path in args.traces]
    weights = [fit(*training_rows(s, args.horizon)) for s in streams]
    for i, path in enumerate(args.traces):
        learned = lambda w: lambda h, e: float(torch.tensor(h.features(e)) @ w)  # noqa: E731
        own, other = replay(streams[i], learned(weights[i])), replay(streams[i], learned(weights[1 - i]))
        print(f"{path}: hit rate, learned mix fitted on this file {own:.4f}, on the other file {other:.4f}")


if __name__ == "__main__":
    main()
