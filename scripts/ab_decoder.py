"""Decode speed of this checkout against another one (say, the commit before a change), in one process: both
load the same checkpoint resident on the CPU and decode greedily, one token each in turn, so a busy machine slows
both alike and the ratio holds. With --compile, the rounds are repeated after torch.compile of this checkout's
norms and rope (offload/bench/profile.py COMPILED), and the compile time is reported.

    git worktree add /tmp/base <commit>
    PYTHONPATH=$PWD python scripts/ab_decoder.py --base /tmp/base [--model DIR] [--compile]
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch


def _import_as(name: str, checkout: Path):
    """The other checkout's `offload` package under another name (its modules import each other relatively)."""
    spec = importlib.util.spec_from_file_location(name, checkout / "offload" / "__init__.py",
                                                  submodule_search_locations=[str(checkout / "offload")])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return importlib.import_module(f"{name}.loading")


def _stepper(model, prompt: torch.Tensor, tokens: int):
    decoder, n = model.decoder, prompt.shape[1]
    cache = decoder.new_cache(1, n + tokens + 1)
    hidden = decoder.hidden_states(prompt, cache, torch.arange(n)[None], torch.ones(1, n, dtype=torch.bool))
    state = {"tok": decoder.logits(hidden[:, -1]).argmax(-1)[:, None], "pos": n, "out": []}
    one = torch.ones(1, 1, dtype=torch.bool)

    def step() -> float:
        t0 = time.perf_counter()
        h = decoder.hidden_states(state["tok"], cache, torch.tensor([[state["pos"]]]), one)
        state["tok"] = decoder.logits(h[:, -1]).argmax(-1)[:, None]
        seconds = time.perf_counter() - t0
        state["pos"] += 1
        state["out"].append(int(state["tok"]))
        return seconds

    return step, state["out"]


def rounds(models: dict, prompt: torch.Tensor, tokens: int, runs: int) -> dict[str, list[float]]:
    """tok/s per run and model, decoding token by token in turn; checks both produce the same tokens."""
    rates: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(runs):
        steppers = {name: _stepper(m, prompt, tokens) for name, m in models.items()}
        times: dict[str, list[float]] = {name: [] for name in models}
        for name, (step, _) in steppers.items():
            step()  # warm
        for _ in range(tokens):
            for name, (step, _) in steppers.items():
                times[name].append(step())
        outputs = [out for _, out in steppers.values()]
        if any(out != outputs[0] for out in outputs):
            raise SystemExit(f"the checkouts decode different tokens: {outputs}")
        for name in models:
            rates[name].append(tokens / sum(times[name]))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="the other checkout (a git worktree)")
    parser.add_argument("--model", type=Path, default=None, help="default: offload-bench e2e's checkpoint")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()

    import offload
    from offload.bench.e2e import DEFAULT_DIR, make_checkpoint
    from offload.bench.profile import compiled

    torch.set_num_threads(args.threads)
    path = make_checkpoint(args.model or DEFAULT_DIR)
    models = {"base": _import_as("offload_base", args.base).load(path, device="cpu"),
              "this": offload.load(path, device="cpu")}
    prompt = torch.randint(1, models["this"].spec.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))

    def report(label: str, rates: dict[str, list[float]]) -> None:
        ratios = [t / b for t, b in zip(rates["this"], rates["base"])]
        print(f"{label}: base {statistics.median(rates['base']):.2f} tok/s ({min(rates['base']):.2f}-"
              f"{max(rates['base']):.2f}), this {statistics.median(rates['this']):.2f} tok/s "
              f"({min(rates['this']):.2f}-{max(rates['this']):.2f}), this/base {statistics.median(ratios):.3f}x "
              f"({min(ratios):.3f}-{max(ratios):.3f}), {args.runs} runs of {args.tokens} tokens", flush=True)

    with torch.inference_mode():
        report("eager", rounds(models, prompt, args.tokens, args.runs))
        if args.compile:
            with compiled(True):
                t0 = time.perf_counter()
                _stepper(models["this"], prompt, 2)[0]()
                print(f"torch.compile: first prefill + decode step {time.perf_counter() - t0:.1f} s", flush=True)
                report("this compiled", rounds(models, prompt, args.tokens, args.runs))


if __name__ == "__main__":
    main()
