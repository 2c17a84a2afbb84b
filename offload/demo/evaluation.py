"""The demo model's three accuracy figures, shared by scripts/train_demo.py (transformers) and
`offload-bench quality` (this runtime): exact match on first turns, on later turns of 2-4-turn
conversations (whose history holds the model's OWN earlier replies, as in a chat), and on phrasings never
trained, each overall and per task kind."""
from __future__ import annotations

from typing import Callable

from offload.demo import tasks

Reply = Callable[[list[list[dict]]], list[str]]  # chats (message lists) -> greedy replies
SPLITS = ("first turn", "later turns", "unseen phrasings")


def _score(results: list[tuple[str, bool]]) -> dict:
    per_kind: dict[str, list[bool]] = {}
    for kind, ok in results:
        per_kind.setdefault(kind, []).append(ok)
    return {"exact_match": sum(ok for _, ok in results) / max(len(results), 1), "n": len(results),
            "per_kind": {k: sum(v) / len(v) for k, v in sorted(per_kind.items())}}


def single_turn(reply: Reply, items: list[tuple[str, str, str]]) -> dict:
    replies = reply([[{"role": "user", "content": q}] for _, q, _ in items])
    return _score([(kind, tasks.is_correct(r, a)) for (kind, _, a), r in zip(items, replies)])


def later_turns(reply: Reply, conversations: list) -> dict:
    """Answer every conversation turn by turn, each turn after the model's own earlier replies; score
    turns 2 and later."""
    own: list[list[str]] = [[] for _ in conversations]
    results = []
    for t in range(max(len(turns) for _, turns in conversations)):
        live = [i for i, (_, turns) in enumerate(conversations) if len(turns) > t]
        chats = [tasks.messages(conversations[i][0], conversations[i][1][:t + 1], own[i]) for i in live]
        for i, r in zip(live, reply(chats)):
            own[i].append(r)
            if t:
                kind, _, answer = conversations[i][1][t]
                results.append((kind, tasks.is_correct(r, answer)))
    return _score(results)


def measure(reply: Reply, n: int = 500, progress: Callable[[str], None] = lambda _: None) -> dict:
    """{split: {"exact_match", "n", "per_kind"}} on n first turns, n // 2 conversations and n unseen
    phrasings (all held out: never trained)."""
    out = {}
    progress(SPLITS[0])
    out[SPLITS[0]] = single_turn(reply, tasks.heldout(n))
    progress(SPLITS[1])
    out[SPLITS[1]] = later_turns(reply, tasks.heldout_conversations(max(1, n // 2)))
    progress(SPLITS[2])
    out[SPLITS[2]] = single_turn(reply, tasks.unseen(n))
    return out
