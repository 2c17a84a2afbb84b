"""Quality per setup, as in the offloading paper's Table 1: held-out task exact match and held-out
perplexity of the bundled demo model, fully resident at every preset and offloaded (a quarter of the
experts cached). Offloading must not change a single number at the same preset."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

SETUPS = [("none", None, None), ("a4e4", "a4e4", None), ("a4e3", "a4e3", None), ("a4e2", "a4e2", None),
          ("nf4", "nf4", None), ("none, offloaded 25%", None, 0.25)]


def _left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def exact_match(model, items, batch: int = 50, max_new_tokens: int = 48) -> float:
    from offload.demo import tasks

    tok, eos = model.tokenizer, set(model.eos_token_ids)
    correct = 0
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        prompts = [model.prompt_ids([{"role": "user", "content": q}])[0].tolist() for _, q, _ in chunk]
        ids, mask = _left_pad(prompts, tok.pad_token_id)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens)[:, ids.shape[1]:]
        for row, (_, _, answer) in zip(out.tolist(), chunk):
            reply = tok.decode([t for t in (row[: next((j for j, t in enumerate(row) if t in eos), len(row))])],
                               skip_special_tokens=True)
            correct += tasks.is_correct(reply, answer)
    return correct / len(items)


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
    from offload.demo import tasks

    items = tasks.heldout(n)
    results = {}
    for label, preset, fraction in SETUPS:
        kwargs = {"quant": preset}
        if fraction:
            probe = offload.load(model, device="cpu")
            kwargs["cache_experts"] = max(1, round(fraction * probe.spec.router.num_experts))
        lm = offload.load(model, device="cpu", **kwargs)
        results[label] = {"exact_match": exact_match(lm, items), "perplexity": perplexity(lm, items[: n // 2])}
    _print(results, n)
    if json_out:
        Path(json_out).write_text(json.dumps(results, indent=2))
    return results


def _print(results: dict, n: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"demo model quality ({n} held-out tasks, greedy)")
    for col in ("setup", "exact match", "perplexity"):
        table.add_column(col)
    for name, r in results.items():
        table.add_row(name, f"{100 * r['exact_match']:.1f}%", f"{r['perplexity']:.4f}")
    Console().print(table)
