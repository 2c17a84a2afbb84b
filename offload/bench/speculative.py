"""MTP speculative decoding on the demo model: acceptance, tokens per forward, expert loads per token and
decode tok/s with and without speculation, fully resident and with a quarter of the experts cached."""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch


def _decode(lm, prompts: list[torch.Tensor], max_new_tokens: int, draft: int) -> tuple[list[list[int]], float, int]:
    """(generated ids per prompt, decode seconds, decoded tokens): the clock starts when the first token
    (the prefill's) is out, so prefill time is excluded exactly."""
    from offload.generate import Sampling

    outputs, seconds, tokens = [], 0.0, 0
    for ids in prompts:
        it = lm._tokens(ids, None, max_new_tokens, Sampling(), list(lm.eos_token_ids), draft)
        first = int(next(it))
        t0 = time.perf_counter()
        rest = [int(t) for t in it]
        seconds += time.perf_counter() - t0
        tokens += len(rest)
        outputs.append([first, *rest])
    return outputs, seconds, tokens


def run(model: str = "demo", prompts: int = 50, max_new_tokens: int = 48, draft_tokens: int = 3,
        runs: int = 5, json_out: Path | None = None) -> dict:
    """Plain and MTP decoding alternate run by run on one loaded model per setup (the draft-length
    estimates persist across calls, as they do for a user); one warm-up pass of each is not counted."""
    import offload
    from offload.demo import tasks

    probe = offload.load(model, device="cpu")
    ids = [probe.prompt_ids([{"role": "user", "content": q}]) for _, q, _ in tasks.heldout(prompts)]
    quarter = max(1, round(probe.spec.router.num_experts / 4))
    results = {}
    for label, cache in (("resident", None), (f"offloaded, cache {quarter}/{probe.spec.router.num_experts}", quarter)):
        lm = offload.load(model, device="cpu", cache_experts=cache)
        modes = {"plain": 0, "mtp": draft_tokens}
        rates: dict[str, list[float]] = {m: [] for m in modes}
        outputs, loads = {}, {}
        for r in range(runs + 1):
            for mode, draft in modes.items():
                before = lm.stats()
                outputs[mode], seconds, tokens = _decode(lm, ids, max_new_tokens, draft)
                after = lm.stats()
                if r:  # run 0 warms up
                    rates[mode].append(tokens / seconds)
                loads[mode] = (after.get("misses", 0) - before.get("misses", 0)) / max(1, sum(map(len, outputs[mode])))
        row = {mode: {"tok_s": statistics.median(rates[mode]), "tok_s_runs": rates[mode],
                      "expert_loads_per_token": loads[mode]} for mode in modes}
        row["mtp"]["speculative"] = lm.stats()["speculative"]
        row["identical_output"] = outputs["plain"] == outputs["mtp"]
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
