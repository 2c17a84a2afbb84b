"""MTP speculative decoding: the MTP layer drafts k tokens, one forward of the main model verifies them.

Greedy decoding gives exactly the plain greedy tokens; sampling uses the standard acceptance rule
(accept a draft d with probability min(1, p(d)/q(d)), else draw from max(p - q, 0)), so the output
distribution is unchanged. The draft length is chosen per step (`DraftLength`) from the measured
acceptance and the measured time of a verify step of each length: under offloading a longer verify
touches more experts, and that cost is in the measurement, so speculation backs off when it would lose.
"""
from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .generate import Sampling, warp
from .model.decoder import Decoder
from .model.mtp import MTPHead


@dataclass
class DraftLength:
    """Chooses k in 0..max_k maximising expected tokens per second: a step drafting k tokens yields
    E(k) = 1 + a_1 + a_1 a_2 + ... + a_1...a_k tokens and costs c(k) seconds, with a_i the acceptance of
    the i-th draft given the ones before it were accepted, and c(k) the measured time of such a step (EMAs
    of both). Acceptance is kept per position because chained drafts are much weaker than the first (on
    the demo model ~0.99 for the first, far lower after), and one pooled rate would misjudge every k.
    Every `explore_every` steps one other length is re-measured, in turn, so no estimate goes stale (a
    cost measured once on a cold cache would otherwise rule its length out for good). A sample counts as at
    most `clip` times its length's estimate: a length that runs only when explored would otherwise keep a
    single stall for hundreds of steps (on a busy 2-core VM, a few stalls parked the chooser on k = 0), while
    a real slowdown still lifts the estimate 20% a step."""

    max_k: int
    acceptance: list[float] = field(default_factory=list)
    cost: dict[int, float] = field(default_factory=dict)
    steps: int = 0
    decay: float = 0.8
    explore_every: int = 16
    prior: float = 0.7
    clip: float = 2.0

    def __post_init__(self) -> None:
        self.acceptance = self.acceptance or [self.prior] * self.max_k

    def choose(self) -> int:
        self.steps += 1
        unmeasured = [k for k in range(self.max_k, -1, -1) if k not in self.cost]
        if unmeasured:
            return unmeasured[0]
        best = max(range(self.max_k + 1), key=self.rate)
        if self.max_k and self.steps % self.explore_every == 0:
            others = [k for k in range(self.max_k + 1) if k != best]
            return others[(self.steps // self.explore_every) % len(others)]
        return best

    def expected_tokens(self, k: int) -> float:
        total, reach = 1.0, 1.0
        for a in self.acceptance[:k]:
            reach *= a
            total += reach
        return total

    def rate(self, k: int) -> float:
        return self.expected_tokens(k) / self.cost[k]

    def update(self, k: int, seconds: float, accepted: int) -> None:
        if k in self.cost:  # timing noise only ever adds: follow a faster step quickly, a slower one slowly
            old = self.cost[k]
            seconds = (old + seconds) / 2 if seconds < old else self.decay * old + (1 - self.decay) * min(
                seconds, self.clip * old)
        self.cost[k] = seconds
        for i in range(min(k, accepted + 1)):  # draft i was judged: accepted if i < accepted
            self.acceptance[i] = self.decay * self.acceptance[i] + (1 - self.decay) * float(i < accepted)


@dataclass
class SpecStats:
    verify_steps: int = 0
    drafted: int = 0
    accepted: int = 0
    first_drafted: int = 0
    first_accepted: int = 0
    tokens: int = 0

    def summary(self) -> dict:
        return {"verify_steps": self.verify_steps, "drafted": self.drafted, "accepted": self.accepted,
                "acceptance": self.accepted / self.drafted if self.drafted else 0.0,
                "first_draft_acceptance": self.first_accepted / self.first_drafted if self.first_drafted else 0.0,
                "tokens_per_forward": self.tokens / self.verify_steps if self.verify_steps else 0.0}


def _distribution(logits: torch.Tensor, history: torch.Tensor, s: Sampling) -> torch.Tensor:
    """The sampling distribution [V] for logits [V]; one-hot on the argmax when greedy."""
    warped = warp(logits[None], history, s)[0]
    if s.temperature == 0:
        return torch.nn.functional.one_hot(warped.argmax(), warped.numel()).float()
    return warped.softmax(-1)


def _draw(logits: torch.Tensor, history: torch.Tensor, s: Sampling, generator) -> tuple[int, torch.Tensor]:
    """(token, the distribution it was drawn from)."""
    probs = _distribution(logits, history, s)
    if s.temperature == 0:
        return int(probs.argmax()), probs
    return int(torch.multinomial(probs, 1, generator=generator)), probs


def _accept(draft: int, p: torch.Tensor, q: torch.Tensor, generator) -> int | None:
    """None if `draft` (drawn from q) is accepted under target p, else the corrected token. With one-hot
    (greedy) p and q this accepts exactly when the draft is the target's argmax."""
    if torch.rand((), generator=generator) * q[draft] < p[draft]:  # accept with probability min(1, p/q)
        return None
    residual = (p - q).clamp(min=0)
    return int(torch.multinomial(residual if residual.sum() > 0 else p, 1, generator=generator))


def speculative_loop(decoder: Decoder, mtp: MTPHead, input_ids: torch.Tensor, max_new_tokens: int,
                     sampling: Sampling, eos_ids: Sequence[int], max_draft: int, stats: SpecStats,
                     chooser: DraftLength | None = None) -> Iterator[torch.Tensor]:
    """Yield tokens [1] one at a time, like generate.token_loop, for a single sequence."""
    if input_ids.shape[0] != 1:
        raise ValueError("speculative decoding runs one sequence at a time; pass a single prompt")
    if max_new_tokens == 0:
        return
    device = decoder.device
    generator = torch.Generator(device=device).manual_seed(sampling.seed) if sampling.seed is not None else None
    chooser = chooser or DraftLength(max_draft)
    T, slack = input_ids.shape[1], max_draft + 1
    cache = decoder.decode_cache(1, T + max_new_tokens + slack, slack)
    mtp_cache = mtp.new_cache(T + max_new_tokens + slack, slack)

    def run_main(tokens: torch.Tensor) -> torch.Tensor:
        start, n = cache.length, tokens.shape[1]
        positions = torch.arange(start, start + n, device=device)[None]
        return decoder.step_hidden(tokens, cache, positions, torch.ones(1, n, dtype=torch.bool, device=device))

    greedy = sampling.temperature == 0 and sampling.repetition_penalty == 1.0  # argmax only, no warping
    try:
        hidden = run_main(input_ids)
        history = input_ids
        token, _ = _draw(decoder.logits(hidden[0, -1]), history, sampling, generator)
        produced = 1
        # The MTP layer's own prefill runs with the main model's, before the first token is out: it reads the
        # prompt's states and drafts the first decode step's token. Afterwards it catches up lazily, when a
        # step drafts: `pending` holds the states and tokens it has not read yet (None: it is up to date).
        ready = mtp.step(hidden, torch.cat((input_ids[:, 1:], history.new_tensor([[token]])), 1), mtp_cache, 0)
        pending: tuple[torch.Tensor, torch.Tensor, int] | None = None
        yield torch.tensor([token], device=device)
        while produced < max_new_tokens and token not in eos_ids:
            k = min(chooser.choose(), max_new_tokens - produced - 1)
            started = time.perf_counter()
            last = cache.length - 1  # position of the newest token the main model has processed
            drafts, draft_probs = [], []
            if k > 0:
                state, logits = mtp.step(*pending[:2], mtp_cache, pending[2]) if pending else ready
                for i in range(k):
                    if greedy:
                        d = int(logits[0, -1].argmax())
                    else:
                        d, q = _draw(logits[0, -1], torch.cat((history, history.new_tensor([[token, *drafts]])), 1),
                                     sampling, generator)
                        draft_probs.append(q)
                    drafts.append(d)
                    if i + 1 < k:
                        state, logits = mtp.step(state[:, -1:], history.new_tensor([[d]]), mtp_cache, last + 1 + i)
                if k > 1:
                    mtp_cache.truncate(last + 1)  # chained drafts were tentative
            verify = history.new_tensor([[token, *drafts]])
            hv = run_main(verify)
            logits = decoder.logits(hv)[0]
            history = torch.cat((history, verify[:, :1]), 1)
            accepted, out = 0, None
            if greedy:  # one argmax over the verified positions
                targets = logits.argmax(-1).tolist()
                while accepted < k and targets[accepted] == drafts[accepted]:
                    accepted += 1
                out = targets[accepted]
                history = torch.cat((history, verify[:, 1:accepted + 1]), 1)
            else:
                for i, d in enumerate(drafts):
                    out = _accept(d, _distribution(logits[i], history, sampling), draft_probs[i], generator)
                    if out is not None:
                        break
                    accepted += 1
                    history = torch.cat((history, verify[:, i + 1:i + 2]), 1)
                if out is None:  # every draft accepted: the verify step's last position gives a bonus token
                    out, _ = _draw(logits[accepted], history, sampling, generator)
            stats.verify_steps += 1
            stats.drafted += k
            stats.accepted += accepted
            stats.first_drafted += k > 0
            stats.first_accepted += k > 0 and accepted > 0
            new = drafts[:accepted] + [out]
            stats.tokens += len(new)
            cache.truncate(last + 2 + accepted)
            chooser.update(k, time.perf_counter() - started, accepted)
            for t in new:
                produced += 1
                yield torch.tensor([t], device=device)
                if t in eos_ids or produced >= max_new_tokens:
                    return
            new_h, new_ids = hv[:, :accepted + 1], history.new_tensor([[*drafts[:accepted], out]])
            if k > 0 or pending is None:
                pending = (new_h, new_ids, last + 1)
            else:  # the MTP layer was not run: its unread inputs grow
                pending = (torch.cat((pending[0], new_h), 1), torch.cat((pending[1], new_ids), 1), pending[2])
            token = out
    finally:
        decoder.release(cache)  # the graph runner's cache goes back
