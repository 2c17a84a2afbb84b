"""Quality per setup, as in the offloading paper's Table 1: the bundled demo model's held-out exact match
on first turns, on later turns of conversations, on phrasings never trained, per task kind, and its
held-out perplexity, fully resident at every preset and offloaded (a quarter of the experts cached).
Offloading must not change a single number at the same preset. It takes minutes: a line per step goes to
stderr so a user sees where it is."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

SETUPS = [("none", None, None), ("a4e4", "a4e4", None), ("a4e3", "a4e3", None), ("a4e2", "a4e2", None),
          ("nf4", "nf4", None), ("none, offloaded 25%", None, 0.25)]


def _left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def replier(model, batch: int = 50, max_new_tokens: int = 48):
    """chats -> greedy replies with this runtime (left-padded batches, each reply cut at its end token)."""
    tok, eos = model.tokenizer, set(model.eos_token_ids)

    def reply(chats: list[list[dict]]) -> list[str]:
        out = []
        for i in range(0, len(chats), batch):
            ids, mask = _left_pad([model.prompt_ids(c)[0].tolist() for c in chats[i:i + batch]], tok.pad_token_id)
            rows = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens)[:, ids.shape[1]:]
            for row in rows.tolist():
                end = next((j for j, t in enumerate(row) if t in eos), len(row))
                out.append(tok.decode(row[:end], skip_special_tokens=True))
        return out
    return reply


def perplexity(model, items) -> float:
    """exp(mean NLL) of the reference reply tokens (and the end token) given the question."""
    tok = model.tokenizer
    nll, count = 0.0, 0
    end = tok.convert_tokens_to_ids(tok.eos_token)
    for _, q, answer in items:
        prompt = model.prompt_ids([{"role": "user", "content": q}])[0].tolist()
        reply = tok(answer, add_special_tokens=False)["input_ids"] + [end]
        ids = torch.tensor([prompt + reply])
        logits = model.forward(ids)[0, len(prompt) - 1:-1]
        nll += torch.nn.functional.cross_entropy(logits, torch.tensor(reply), reduction="sum").item()
        count += len(reply)
    return math.exp(nll / count)


def run(model: str = "demo", n: int = 200, json_out: Path | None = None) -> dict:
    import offload
    from offload.demo import evaluation, tasks

    results, start = {}, time.time()
    for k, (label, preset, fraction) in enumerate(SETUPS, 1):
        def say(step: str) -> None:
            print(f"[{k}/{len(SETUPS)} {time.time() - start:5.0f} s] {label}: {step}", file=sys.stderr, flush=True)

        say("loading")
        kwargs = {"quant": preset}
        if fraction:
            probe = offload.load(model, device="cpu")
            kwargs["cache_experts"] = max(1, round(fraction * probe.spec.router.num_experts))
        lm = offload.load(model, device="cpu", **kwargs)
        results[label] = evaluation.measure(replier(lm), n, say)
        say("perplexity")
        results[label]["perplexity"] = perplexity(lm, tasks.heldout(n)[: n // 2])
    print(f"done in {time.time() - start:.0f} s", file=sys.stderr, flush=True)
    _print(results, n)
    if json_out:
        Path(json_out).write_text(json.dumps(results, indent=2))
    return results


def _print(results: dict, n: int) -> None:
    from rich.console import Console
    from rich.table import Table

    from offload.demo import evaluation, tasks

    console = Console()
    table = Table(title=f"demo model quality (greedy exact match; held out, {n} first turns, {n // 2} chats, "
                        f"{n} unseen phrasings)")
    for col in ("setup", *evaluation.SPLITS, "perplexity"):
        table.add_column(col, justify="left" if col == "setup" else "right")
    for name, r in results.items():
        table.add_row(name, *(f"{100 * r[s]['exact_match']:.1f}%" for s in evaluation.SPLITS), f"{r['perplexity']:.4f}")
    console.print(table)
    per_kind = Table(title="per task kind, first setup (first turn / later turns / unseen phrasings, %)")
    per_kind.add_column("kind")
    for s in evaluation.SPLITS:
        per_kind.add_column(s, justify="right")
    first = next(iter(results.values()))
    for kind in tasks.KINDS:
        per_kind.add_row(kind, *(f"{100 * first[s]['per_kind'][kind]:.0f}" if kind in first[s]["per_kind"] else "-"
                                 for s in evaluation.SPLITS))
    console.print(per_kind)
