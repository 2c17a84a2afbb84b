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
    """Per-token routing of `layers`, the last `window` tokens, with the similarity of every earlier
    token to the current one kept up to date as the current token's layers arrive."""

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
        self._seen = np.zeros((rows, cols), dtype=bool)
        self._experts = np.full((rows, cols, self.top_k), UNKNOWN, dtype=np.int64)
        self._matches = np.zeros(rows)  # per earlier token s: layers equal to the current token's ...
        self._compared = np.zeros(rows)  # ... out of layers known for both (at the previous token too)
        self._rows = 0
        self._token: int | None = None

    def record(self, token: int, layer: int, experts: Sequence[int]) -> None:
        """Layer `layer` routed token `token` to `experts`."""
        if self._token is None or token > self._token:
            self._start_row()
            self._token = token
        elif token < self._token:
            raise ValueError(f"tokens must not decrease: got {token} after {self._token}")
        t, col = self._rows - 1, self.column[layer]
        if self._seen[t, col]:  # a second decision for this cell: no longer one token's routing
            if self._code[t, col] != UNKNOWN:
                self._count(t, col, self._code[t, col], -1)
                self._code[t, col] = UNKNOWN
                self._experts[t, col] = UNKNOWN
            return
        self._seen[t, col] = True
        if len(experts) > self.top_k:
            return
        code = hash(tuple(sorted(experts)))  # never -1 in CPython
        self._code[t, col] = code
        self._experts[t, col, : len(experts)] = experts
        self._count(t, col, code, +1)

    @property
    def tokens(self) -> int:
        """Tokens held (at most `window`)."""
        return self._rows

    def routed(self, back: int, layer: int) -> tuple[int, ...] | None:
        """The experts `layer` routed to `back` tokens before the current one (0: the current one), or
        None where that is unknown (not recorded, a repeated or multi-token decision, or dropped)."""
        t = self._rows - 1 - back
        if back < 0 or t < 0 or self._code[t, self.column[layer]] == UNKNOWN:
            return None
        return tuple(int(e) for e in self._experts[t, self.column[layer]] if e != UNKNOWN)

    def _start_row(self) -> None:
        if self._rows == self.window:  # drop the older half
            keep = self.window // 2
            self._code[:keep] = self._code[-keep:].copy()
            self._code[keep:] = UNKNOWN
            self._seen[:keep] = self._seen[-keep:].copy()
            self._seen[keep:] = False
            self._experts[:keep] = self._experts[-keep:].copy()
            self._experts[keep:] = UNKNOWN
            self._rows = keep
        t = self._rows
        self._rows += 1
        self._matches[:] = 0
        self._compared[:] = 0
        if t >= 2:  # earlier tokens s >= 1 against the current one, at the token before: s-1 vs t-1
            before, prev = self._code[: t - 1], self._code[t - 1]
            known = (before != UNKNOWN) & (prev != UNKNOWN)
            self._matches[1:t] = ((before == prev) & known).sum(1)
            self._compared[1:t] = known.sum(1)

    def _count(self, t: int, col: int, code: int, sign: int) -> None:
        """Add (or take back) the current token's decision at `col` to every earlier token's similarity."""
        earlier = self._code[:t, col]
        known = earlier != UNKNOWN
        self._matches[:t] += sign * ((earlier == code) & known)
        self._compared[:t] += sign * known

    def continuation(self, layer: int, experts: Sequence[int], horizon: int = 2,
                     sharpness: float = 4.0) -> tuple[float, list[float]]:
        """(confidence, votes): for each of `experts`, the share of earlier tokens, weighted by
        similarity**sharpness, after which `layer` routed to it within `horizon` tokens; confidence is the
        best similarity (0 with no usable earlier token). Similarity: the fraction of layers, at this
        token so far and the one before, where the earlier token routed exactly as now."""
        t = self._rows - 1
        last = t - 2  # s + 1 <= t - 1: at least one complete token after s
        if last < 1:
            return 0.0, [0.0] * len(experts)
        col = self.column[layer]
        candidates = np.arange(1, last + 1)
        compared = self._compared[1 : last + 1]
        similarity = np.divide(self._matches[1 : last + 1], compared, out=np.zeros(last), where=compared > 0)
        after = np.minimum(candidates[:, None] + np.arange(1, horizon + 1), t - 1)  # [s, h], clipped rows repeat
        known = (self._code[after, col] != UNKNOWN).any(1)
        weight = np.where(known, similarity, 0.0) ** sharpness
        total = weight.sum()
        if total <= 0:
            return 0.0, [0.0] * len(experts)
        following = self._experts[after, col]  # [s, h, top_k]
        votes = [float(weight[(following == e).any((1, 2))].sum() / total) for e in experts]
        return float(similarity[known].max()), votes
