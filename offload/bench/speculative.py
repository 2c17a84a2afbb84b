"""MTP speculative decoding on the demo model: acceptance, tokens per forward, expert loads per token and
decode tok/s with and without speculation, fully resident and with a quarter of the experts cached."""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch


def _decode(lm, ids: torch.Tensor, max_new_tokens: int, draft: int) -> tuple[list[int], float, int]:
    """(generated ids, decode seconds, decoded tokens) for one prompt: the clock starts when the first
    token (the prefill's) is out, so prefill time is excluded exactly."""
    from offload.generate import Sampling

    it = lm._tokens(ids, None, max_new_tokens, Sampling(), list(lm.eos_token_ids), draft)
    first = int(next(it))
    t0 = time.perf_counter()
    rest = [int(t) for t in it]
    return [first, *rest], time.perf_counter() - t0, len(rest)


def run(model: str = "demo", prompts: int = 50, max_new_tokens: int = 48, draft_tokens: int = 3,
        runs: int = 5, json_out: Path | None = None, device: str = "cpu") -> dict:
    """Plain and MTP decoding take turns prompt by prompt (which goes first alternates) on one loaded model
    per setup, so a slow spell of a shared machine hits both alike; a run's rate is its tokens over its
    seconds, and each mode reports the median of `runs` runs after one warm-up run; the speedup is the
    median of the runs' paired ratios. The draft-length estimates persist across calls, as they do for a
    user."""
    import offload
    from offload.demo import tasks

    probe = offload.load(model, device="cpu")
    ids = [probe.prompt_ids([{"role": "user", "content": q}]).to(device) for _, q, _ in tasks.heldout(prompts)]
    quarter = max(1, round(probe.spec.router.num_experts / 4))
    modes = {"plain": 0, "mtp": draft_tokens}
    results = {}
    for label, cache in (("resident", None), (f"offloaded, cache {quarter}/{probe.spec.router.num_experts}", quarter)):
        lm = offload.load(model, device=device, cache_experts=cache)
        rates: dict[str, list[float]] = {m: [] for m in modes}
        outputs: dict[str, list[list[int]]] = {m: [] for m in modes}
        misses = {m: 0 for m in modes}
        for r in range(runs + 1):  # run 0 warms up
            seconds, tokens = dict.fromkeys(modes, 0.0), dict.fromkeys(modes, 0)
            for i, prompt in enumerate(ids):
                for mode in (list(modes) if (i + r) % 2 == 0 else list(modes)[::-1]):
                    before = lm.stats().get("misses", 0)
                    out, sec, n = _decode(lm, prompt, max_new_tokens, modes[mode])
                    seconds[mode] += sec
                    tokens[mode] += n
                    if r == runs:
                        outputs[mode].append(out)
                        misses[mode] += lm.stats().get("misses", 0) - before
            if r:
                for mode in modes:
                    rates[mode].append(tokens[mode] / seconds[mode])
        row = {mode: {"tok_s": statistics.median(rates[mode]), "tok_s_runs": rates[mode],
                      "expert_loads_per_token": misses[mode] / max(1, sum(map(len, outputs[mode])))}
               for mode in modes}
        row["mtp"]["speculative"] = lm.stats()["speculative"]
        row["identical_output"] = outputs["plain"] == outputs["mtp"]
        row["speedup_runs"] = [m / p for m, p in zip(rates["mtp"], rates["plain"])]
        row["speedup"] = statistics.median(row["speedup_runs"])  # paired: both modes of one run saw one machine
        results[label] = row
    _print(results, "CPU" if device == "cpu" else torch.cuda.get_device_name(device))
    if json_out:
        Path(json_out).write_text(json.dumps(results, indent=2))
    return results


def _print(results: dict, where: str) -> None:
    from rich.table import Table

    from offload.bench.table import print_table

    table = Table(title=f"MTP speculative decoding, demo model, {where}, greedy")
    for col in ("setup", "plain tok/s", "mtp tok/s", "speedup", "1st-draft acceptance", "tokens/forward",
                "expert loads/token plain -> mtp", "identical"):
        table.add_column(col)
    for name, r in results.items():
        s = r["mtp"]["speculative"]
        table.add_row(name, f"{r['plain']['tok_s']:.1f}", f"{r['mtp']['tok_s']:.1f}", f"{r['speedup']:.2f}x",
                      f"{s['first_draft_acceptance']:.2f}", f"{s['tokens_per_forward']:.2f}",
                      f"{r['plain']['expert_loads_per_token']:.2f} -> {r['mtp']['expert_loads_per_token']:.2f}",
                      str(r["identical_output"]))
    print_table(table)
