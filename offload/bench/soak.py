"""offload-bench soak: does a long run leak? Memory, threads and open files over thousands of generated tokens
(offloaded, so the copier thread, the slots and the host store all turn over), and over repeated load/unload
cycles.

Decode: prompts from the demo's held-out tasks, each continued for `step` tokens regardless of EOS (the chat
answers alone are a dozen tokens), sampled after every call: RSS, OS threads, open file descriptors. The RSS
slope is a least-squares fit over the samples after the first fifth (allocator warm-up), in MB per 1000 tokens.
Cycles: load, generate a few tokens, drop the model, collect; RSS after each cycle, growth first -> last.
"""
from __future__ import annotations

import gc
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import torch


@dataclass
class Sample:
    tokens: int
    rss_mb: float
    threads: int
    fds: int


def _sample(tokens: int) -> Sample:
    proc = psutil.Process()
    return Sample(tokens, proc.memory_info().rss / 2**20, proc.num_threads(), proc.num_fds())


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs (0 with fewer than two distinct xs)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return 0.0 if var == 0 else sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var


def decode(model: str, tokens: int, step: int, cache_experts: int | None) -> dict:
    import offload
    from offload.demo import tasks

    lm = offload.load(model, device="cpu", cache_experts=cache_experts)
    prompts = [lm.prompt_ids([{"role": "user", "content": q}]) for _, q, _ in tasks.heldout(50)]
    samples, done, start, i = [_sample(0)], 0, time.perf_counter(), 0
    while done < tokens:
        prompt = prompts[i % len(prompts)]
        n = min(step, lm.spec.max_position_embeddings - prompt.shape[1])
        done += lm.generate(prompt, max_new_tokens=n, eos_token_ids=[]).shape[1] - prompt.shape[1]
        samples.append(_sample(done))
        i += 1
    seconds = time.perf_counter() - start
    settled = samples[len(samples) // 5:]
    return dict(tokens=done, calls=i, seconds=seconds, tokens_per_s=done / seconds,
                rss_slope_mb_per_1k_tokens=1000 * slope([s.tokens for s in settled], [s.rss_mb for s in settled]),
                rss_mb=(samples[0].rss_mb, samples[-1].rss_mb), threads=_span(samples, "threads"),
                fds=_span(samples, "fds"), samples=[asdict(s) for s in samples])


def cycles(model: str, count: int, cache_experts: int | None) -> dict:
    import offload

    before = _sample(0)
    ids = torch.tensor([[1, 5, 9, 13]])
    samples = []
    for c in range(count):
        lm = offload.load(model, device="cpu", cache_experts=cache_experts)
        lm.generate(ids, max_new_tokens=4)
        del lm
        gc.collect()
        samples.append(_sample(c + 1))
    tail = samples[len(samples) // 5:]
    return dict(cycles=count, rss_mb=(before.rss_mb, samples[0].rss_mb, samples[-1].rss_mb),
                rss_growth_after_first_mb=samples[-1].rss_mb - samples[0].rss_mb,
                rss_slope_mb_per_100_cycles=100 * slope([s.tokens for s in tail], [s.rss_mb for s in tail]),
                threads=(before.threads, samples[-1].threads), fds=(before.fds, samples[-1].fds),
                samples=[asdict(s) for s in samples])


def _span(samples: list[Sample], field: str) -> tuple[int, int, int, int]:
    """(first, min, max, last)."""
    values = [getattr(s, field) for s in samples]
    return values[0], min(values), max(values), values[-1]


def run(model: str = "demo", tokens: int = 2000, step: int = 100, load_cycles: int = 100,
        cache_experts: int | None = 4, json_out: Path | None = None) -> dict:
    result = {"model": model, "cache_experts": cache_experts, "decode": decode(model, tokens, step, cache_experts),
              "load_cycles": cycles(model, load_cycles, cache_experts)}
    d, c = result["decode"], result["load_cycles"]
    print(f"decode: {d['tokens']} tokens in {d['calls']} calls, {d['seconds']:.0f} s ({d['tokens_per_s']:.1f} tok/s), "
          f"cache_experts={cache_experts}")
    print(f"  RSS {d['rss_mb'][0]:.0f} -> {d['rss_mb'][1]:.0f} MB, slope {d['rss_slope_mb_per_1k_tokens']:+.2f} MB "
          f"per 1000 tokens (after the first fifth)")
    print(f"  threads first/min/max/last {d['threads']}, open fds {d['fds']}")
    print(f"load/unload: {c['cycles']} cycles, RSS before {c['rss_mb'][0]:.0f}, after cycle 1 {c['rss_mb'][1]:.0f}, "
          f"after the last {c['rss_mb'][2]:.0f} MB (growth after the first {c['rss_growth_after_first_mb']:+.1f} MB, "
          f"slope {c['rss_slope_mb_per_100_cycles']:+.2f} MB per 100 cycles)")
    print(f"  threads before/after {c['threads']}, open fds before/after {c['fds']}")
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=1))
    return result
