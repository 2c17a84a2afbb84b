"""`offload-bench split`: what the CPU + GPU split gains, side by side in one process, interleaved runs: resident,
slots with misses copied in, slots with misses computed on the CPU by the caller (one after the other), and the
split (cold experts on the host worker while the device computes the hot ones). The split against the caller's
CPU misses is the overlap's gain; every run's tokens are checked against the resident run's."""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

import offload

SETUPS = {"resident": {}, "slots, misses copied": {"miss_policy": "load"},
          "slots, misses on the CPU by the caller": {"miss_policy": "cpu"},
          "split, cold experts on the CPU worker": {"placement": "split"}}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(path: Path, device: str = "cuda", quant: str | None = None, cache_fraction: float = 0.25, tokens: int = 32,
        prompt_tokens: int = 16, runs: int = 3, json_out: Path | None = None) -> dict:
    dev = torch.device(device)
    models = {}
    for name, options in SETUPS.items():
        if name != "resident":
            experts = models["resident"].spec.router.num_experts
            options = options | {"cache_experts": max(1, round(cache_fraction * experts)), "prefetch": 0}
        models[name] = offload.load(path, device=dev, quant=quant, **options)
    vocab = models["resident"].spec.vocab_size
    prompt = torch.randint(3, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    reference = models["resident"].generate(prompt, max_new_tokens=tokens)
    rates: dict[str, list[float]] = {name: [] for name in models}
    identical = {name: True for name in models}
    names = list(models)
    for r in range(runs):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotated: none always runs first
            _sync(dev)
            start = time.perf_counter()
            out = models[name].generate(prompt, max_new_tokens=tokens)
            _sync(dev)
            rates[name].append(tokens / (time.perf_counter() - start))
            identical[name] &= torch.equal(out, reference)
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    result = {"device": device_name, "checkpoint": str(path), "quant": quant, "tokens": tokens, "runs": runs,
              "tok_s": {n: statistics.median(v) for n, v in rates.items()}, "tok_s_all": rates,
              "identical_tokens": identical,
              "cpu_computed": {n: m.stats().get("cpu_computed", 0) for n, m in models.items()}}
    result["split_over_caller_cpu"] = (result["tok_s"]["split, cold experts on the CPU worker"]
                                       / result["tok_s"]["slots, misses on the CPU by the caller"])
    for name, rate in result["tok_s"].items():
        print(f"{name:42} {rate:8.2f} tok/s (generate incl. prefill, median of {runs}); same tokens as resident: "
              f"{identical[name]}")
    print(f"split / misses on the CPU by the caller: {result['split_over_caller_cpu']:.2f}x ({device_name})")
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2))
    return result
