"""MTP speculative decoding on the demo model: acceptance, tokens per forward, expert loads per token and
decode tok/s with and without speculation, fully resident and with a quarter of the experts cached."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch


def _decode(lm, prompts: list[torch.Tensor], max_new_tokens: int, **kw) -> tuple[list[list[int]], float, int]:
    """(generated ids per prompt, decode seconds, new tokens); prefill time is measured and excluded."""
    outputs, seconds, tokens = [], 0.0, 0
    for ids in prompts:
        t0 = time.perf_counter()
        lm.generate(ids, max_new_tokens=1, **kw)
        t1 = time.perf_counter()
        out = lm.generate(ids, max_new_tokens=max_new_tokens, **kw)
        t2 = time.perf_counter()
        new = out.shape[1] - ids.shape[1]
        seconds += max(0.0, (t2 - t1) - (t1 - t0))
        tokens += new - 1
        outputs.append(out[0, ids.shape[1]:].tolist())
    return outputs, seconds, tokens


def run(model: str = "demo", prompts: int = 20, max_new_tokens: int = 48, draft_tokens: int = 3,
        runs: int = 3, json_out: Path | None = None) -> dict:
    import offload
    from offload.demo import tasks

    probe = offload.load(model, device="cpu")
    ids = [probe.prompt_ids([{"role": "user", "content": q}]) for _, q, _ in tasks.heldout(prompts)]
    quarter = max(1, round(probe.spec.router.num_experts / 4))
    results = {}
    for label, cache in (("resident", None), (f"offloaded, cache {quarter}/{probe.spec.router.num_experts}", quarter)):
        row = {}
        for mode, kw in (("plain", {}), ("mtp", {"speculative": "mtp", "draft_tokens": draft_tokens})):
            rates, outputs = [], None
            for _ in range(runs):
                lm = offload.load(model, device="cpu", cache_experts=cache)
                outputs, seconds, tokens = _decode(lm, ids, max_new_tokens, **kw)
                rates.append(tokens / seconds)
            stats = lm.stats()
            row[mode] = {"tok_s": sorted(rates)[len(rates) // 2], "outputs": outputs,
                         "expert_loads_per_token": stats.get("misses", 0) / max(1, sum(map(len, outputs))),
                         **({"speculative": stats["speculative"]} if mode == "mtp" else {})}
        row["identical_output"] = row["plain"].pop("outputs") == row["mtp"].pop("outputs")
        row["speedup"] = row["mtp"]["tok_s"] / row["plain"]["tok_s"]
        results[label] = row
    _print(results)
    if json_out:
        Path(json_out).write_text(json.dumps(results, indent=2))
    return results


def _print(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="MTP speculative decoding, demo model, CPU, greedy")
    for col in ("setup", "plain tok/s", "mtp tok/s", "speedup", "1st-draft acceptance", "tokens/forward",
                "expert loads/token plain -> mtp", "identical"):
        table.add_column(col)
    for name, r in results.items():
        s = r["mtp"]["speculative"]
        table.add_row(name, f"{r['plain']['tok_s']:.1f}", f"{r['mtp']['tok_s']:.1f}", f"{r['speedup']:.2f}x",
                      f"{s['first_draft_acceptance']:.2f}", f"{s['tokens_per_forward']:.2f}",
                      f"{r['plain']['expert_loads_per_token']:.2f} -> {r['mtp']['expert_loads_per_token']:.2f}",
                      str(r["identical_output"]))
    Console().print(table)
