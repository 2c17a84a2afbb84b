"""What every MoE layer routed to at each token so far, and lookup of the earlier token that routed like
the current one: prompt-lookup decoding, in routing space.

Generated text repeats itself (code most of all), and a token's routing over all layers is close to a
fingerprint of the token in its context. So the earlier tokens whose routing, at the previous token and
at the layers the current token has passed so far, matches the current one's, tend to be followed by
what follows now. Per-layer routing history cannot see this: on the real Mixtral traces, a layer's own
past says little beyond one step (docs/cache_policies.md).

The driver (engine or trace replay) records each router decision before the layer's policy sees it;
tokens are keys that never decrease. A (token, layer) recorded twice, or a decision of more than
`top_k` experts (a prefill or a batch: not one token's routing), is stored as unknown and never matches.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

UNKNOWN = -1


class RoutingHistory:
    """Per-token routing of `layers`, the last `window` tokens. Recording is a few array writes; the
    similarities are brought up to date only when a policy asks."""

    def __init__(self, layers: Sequence[int], top_k: int, window: int = 1024) -> None:
        if top_k < 1 or window < 4:
            raise ValueError(f"need top_k >= 1 and window >= 4, got top_k={top_k}, window={window}")
        self.column = {layer: i for i, layer in enumerate(layers)}
        self.top_k, self.window = top_k, window
        self.reset()

    def reset(self) -> None:
        """Forget every token (a new, unrelated sequence)."""
        rows, cols = self.window, len(self.column)
        self._code = np.full((rows, cols), UNKNOWN, dtype=np.int64)  # one id per expert set
        self._experts = np.full((rows, cols, self.top_k), UNKNOWN, dtype=np.int64)
        self._seen = np.zeros((rows, cols), dtype=bool)
        self._rows = 0
        self._started = 0  # tokens ever started: names the current one across window trims
        self._token: int | None = None
        self._records = 0  # decisions recorded: keys the cached votes
        self._highest = 0  # the highest expert id recorded
        self._votes: dict[tuple, tuple[float, np.ndarray]] = {}
        # per earlier token, the layers routed alike and the layers compared: the token before's part, plus
        # the current token's layers folded in as they arrive (`_folded`: column -> code); for token `_scored`
        self._scored = -1
        self._matches, self._compared = np.zeros(0), np.zeros(0)
        self._folded: dict[int, int] = {}

    @property
    def tokens(self) -> int:
        """Tokens held (at most `window`)."""
        return self._rows

    def record(self, token: int, layer: int, experts: Sequence[int]) -> None:
        """Layer `layer` routed token `token` to `experts`."""
        if self._token is None or token > self._token:
            self._start_row()
            self._token = token
        elif token < self._token:
            raise ValueError(f"tokens must not decrease: got {token} after {self._token}")
        t, col = self._rows - 1, self.column[layer]
        if self._seen[t, col] or len(experts) > self.top_k:  # not one token's routing at this layer
            self._code[t, col] = UNKNOWN
            self._experts[t, col] = UNKNOWN
        else:
            self._code[t, col] = hash(tuple(sorted(experts)))  # never -1 in CPython
            self._experts[t, col, : len(experts)] = experts
            self._highest = max(self._highest, *experts)
        self._seen[t, col] = True
        self._records += 1

    def _start_row(self) -> None:
        if self._rows == self.window:  # drop the older half
            keep = self.window // 2
            for table, empty in ((self._code, UNKNOWN), (self._experts, UNKNOWN), (self._seen, False)):
                table[:keep] = table[-keep:].copy()
                table[keep:] = empty
            self._rows = keep
        self._rows += 1
        self._started += 1

    def routed(self, back: int, layer: int) -> tuple[int, ...] | None:
        """The experts `layer` routed to `back` tokens before the current one (0: the current one), or
        None where that is unknown (not recorded, a repeated or multi-token decision, or dropped)."""
        t = self._rows - 1 - back
        if back < 0 or t < 0 or self._code[t, self.column[layer]] == UNKNOWN:
            return None
        return tuple(int(e) for e in self._experts[t, self.column[layer]] if e != UNKNOWN)

    def similarity(self) -> np.ndarray:
        """For every earlier token s (index 0 = the oldest held; s = 0 has no token before it and scores
        0): the fraction of layers, at s and at the token before s, that routed exactly as the current
        token and the one before it did, over the layers known in both."""
        t = self._rows - 1
        if t < 2:
            return np.zeros(max(t, 0))
        if self._scored != self._started:  # tokens s - 1 against the token before: fixed for the token
            before, now = self._code[: t - 1], self._code[t - 1]
            known = (before != UNKNOWN) & (now != UNKNOWN)
            self._matches, self._compared = np.zeros(t), np.zeros(t)
            self._matches[1:], self._compared[1:] = ((before == now) & known).sum(1), known.sum(1)
            self._scored, self._folded = self._started, {}
        for col in np.flatnonzero(self._seen[t]):  # the current token's layers
            code = int(self._code[t, col])
            if self._folded.get(col, UNKNOWN) != code:
                self._fold(t, col, self._folded.get(col, UNKNOWN), -1)
                self._fold(t, col, code, +1)
                self._folded[col] = code
        return np.divide(self._matches, self._compared, out=np.zeros(t), where=self._compared > 0)

    def _fold(self, t: int, col: int, code: int, sign: int) -> None:
        """Add (or take back) the current token's decision at `col` to every earlier token's agreement."""
        if code != UNKNOWN:
            earlier = self._code[:t, col]
            self._matches += sign * (earlier == code)
            self._compared += sign * (earlier != UNKNOWN)

    def continuation(self, layer: int, experts: Sequence[int], horizon: int = 2,
                     sharpness: float = 4.0) -> tuple[float, list[float]]:
        """(confidence, votes): for each of `experts`, how often `layer` routed to it in the `horizon`
        tokens after each earlier token s (a fraction of `horizon`), averaged over s weighted by
        similarity**sharpness; confidence is the best similarity among them (0 with no usable s)."""
        key = (self._records, self.column[layer], horizon, sharpness)
        if key not in self._votes:  # several evictions (misses, prefetches) often share one state
            self._votes = {k: v for k, v in self._votes.items() if k[0] == self._records}
            self._votes[key] = self._vote(*key[1:])
        confidence, votes = self._votes[key]
        return confidence, [float(votes[e + 1]) if e + 1 < len(votes) else 0.0 for e in experts]

    def _vote(self, col: int, horizon: int, sharpness: float) -> tuple[float, np.ndarray]:
        """continuation() for every expert at once: votes[e + 1] is expert e's."""
        t = self._rows - 1
        last = t - 2  # s + 1 <= t - 1: at least one complete token after s
        if last < 1:
            return 0.0, np.zeros(0)
        rows = [self._experts[1 + h : min(last + 1 + h, t), col] for h in range(1, horizon + 1)]
        known = np.zeros(last, dtype=bool)
        for r in rows:
            known[: len(r)] |= r[:, 0] != UNKNOWN
        similarity = self.similarity()[1 : last + 1]
        weight = np.where(known, similarity, 0.0) ** sharpness
        total = weight.sum()
        if total <= 0:
            return 0.0, np.zeros(0)
        votes = np.zeros(self._highest + 2)  # index e + 1; UNKNOWN lands on 0
        for r in rows:  # each of the next `horizon` tokens after s adds its experts, weighted by s
            votes += np.bincount((r + 1).ravel(), np.repeat(weight[: len(r)], r.shape[1]), minlength=len(votes))
        return float(similarity[known].max()), votes / (total * horizon)
