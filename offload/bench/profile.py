"""Where a CPU decode step goes: torch ops and time per token by category (attention projections, attention
core, norms/rope, router, experts, LM head, Python overhead), by default on `offload-bench e2e`'s OLMoE-shaped
checkpoint.

The categories come from wrapping the decoder's functions in `torch.profiler.record_function` for the run (the
code itself carries no annotations). A category's time is its exclusive wall time (nested categories
subtracted); "of which torch ops" is the CPU time of the top-level torch ops inside it; the rest, summed, is
Python between the ops (inflated by the profiler's own cost per op and per probe). tok/s comes from runs
without the profiler.
"""
from __future__ import annotations

import cProfile
import contextlib
import functools
import importlib
import io
import json
import pstats
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

# (module, class or None, attribute, category); the innermost probe wins (a norm inside attention: "norms/rope")
PROBES = [
    ("offload.model.decoder", None, "attention", "attention core"),
    ("offload.model.attention", None, "linear", "attention projections"),
    ("offload.model.decoder", None, "rms_norm", "norms/rope"),
    ("offload.model.attention", None, "rms_norm", "norms/rope"),
    ("offload.model.attention", None, "apply_rotary", "norms/rope"),
    ("offload.model.rope", "RotaryTable", "cos_sin", "norms/rope"),
    ("offload.model.decoder", None, "route", "router"),
    ("offload.model.decoder", None, "moe", "experts"),
    ("offload.model.decoder", "Decoder", "logits", "LM head"),
]
CATEGORIES = ["attention projections", "attention core", "norms/rope", "router", "experts", "LM head"]
OTHER = "other (embedding, residuals, loop)"
# the dense part's pure tensor functions (no cache writes, no host syncs): what torch.compile can take whole
COMPILED = [("offload.model.decoder", "rms_norm"), ("offload.model.attention", "rms_norm"),
            ("offload.model.attention", "apply_rotary")]


def _owner(module: str, cls: str | None, attribute: str):
    """The module or class holding `attribute`; None when this version of the code has no such name."""
    owner = importlib.import_module(module)
    owner = getattr(owner, cls) if cls else owner
    return owner if attribute in vars(owner) else None


@contextlib.contextmanager
def probes() -> Iterator[None]:
    """Wrap each probed function in a record_function named by its category, for the duration."""
    saved = []
    for module, cls, attribute, category in PROBES:
        owner = _owner(module, cls, attribute)
        if owner is None:
            continue
        original = owner.__dict__[attribute]

        def wrapped(*args, _f=original, _name=category, **kwargs):
            with torch.profiler.record_function(_name):
                return _f(*args, **kwargs)

        setattr(owner, attribute, functools.wraps(original)(wrapped))
        saved.append((owner, attribute, original))
    try:
        yield
    finally:
        for owner, attribute, original in reversed(saved):
            setattr(owner, attribute, original)


@contextlib.contextmanager
def compiled(enabled: bool) -> Iterator[None]:
    """torch.compile (dynamic shapes) the COMPILED functions for the duration, when enabled."""
    saved = []
    for module, attribute in COMPILED if enabled else []:
        owner = importlib.import_module(module)
        saved.append((owner, attribute, getattr(owner, attribute)))
        setattr(owner, attribute, torch.compile(getattr(owner, attribute), dynamic=True))
    try:
        yield
    finally:
        for owner, attribute, original in saved:
            setattr(owner, attribute, original)


def _decode(model, prompt: torch.Tensor, tokens: int) -> Callable[[], None]:
    """A prefilled cache and a function that decodes one greedy token into it."""
    decoder = model.decoder
    n = prompt.shape[1]
    cache = decoder.new_cache(1, n + tokens + 1)
    state = {"pos": n}
    hidden = decoder.hidden_states(prompt, cache, torch.arange(n)[None], torch.ones(1, n, dtype=torch.bool))
    state["tok"] = decoder.logits(hidden[:, -1]).argmax(-1)[:, None]
    one = torch.ones(1, 1, dtype=torch.bool)

    def step() -> None:
        pos = torch.tensor([[state["pos"]]])
        h = decoder.hidden_states(state["tok"], cache, pos, one)
        state["tok"] = decoder.logits(h[:, -1]).argmax(-1)[:, None]
        state["pos"] += 1

    return step


def _table(prof, tokens: int) -> dict[str, dict]:
    """Per category: exclusive wall µs, top-level torch ops and their CPU µs, per token."""
    events = prof.events()
    names = set(CATEGORIES)
    wall: dict[str, float] = defaultdict(float)
    op_us: dict[str, float] = defaultdict(float)
    ops: Counter = Counter()
    for e in events:
        if e.name in names:
            nested = sum(c.time_range.elapsed_us() for c in e.cpu_children if c.name in names)
            wall[e.name] += e.time_range.elapsed_us() - nested
            continue
        parent = e.cpu_parent
        if parent is None or parent.name in names:  # a top-level torch op (of the step or of a category)
            category = parent.name if parent is not None else OTHER
            ops[category] += 1
            op_us[category] += e.time_range.elapsed_us()
    return {c: {"ops": ops[c] / tokens, "ms": wall.get(c, op_us[c]) / tokens / 1e3, "op_ms": op_us[c] / tokens / 1e3}
            for c in [*CATEGORIES, OTHER]}


def run(path: Path | None = None, tokens: int = 16, runs: int = 5, threads: int = 2, top: int = 15,
        json_out: Path | None = None, compile_dense: bool = False) -> dict:
    import offload
    from offload.bench.e2e import DEFAULT_DIR, make_checkpoint

    torch.set_num_threads(threads)
    path = make_checkpoint(path or DEFAULT_DIR)
    model = offload.load(path, device="cpu")
    prompt = torch.randint(1, model.spec.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    rates = []
    with torch.inference_mode(), compiled(compile_dense):
        t0 = time.perf_counter()  # the first prefill and decode step: compile time when compiling
        _decode(model, prompt, 1)()
        first_s = time.perf_counter() - t0
        for _ in range(runs):  # without the profiler: what a user gets
            step = _decode(model, prompt, tokens)
            step()
            t0 = time.perf_counter()
            for _ in range(tokens):
                step()
            rates.append(tokens / (time.perf_counter() - t0))
        step = _decode(model, prompt, 2 * tokens)
        step()
        with probes(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(tokens):
                step()
            profiled_ms = (time.perf_counter() - t0) / tokens * 1e3
        stats = io.StringIO()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(tokens):
            step()
        profiler.disable()
    pstats.Stats(profiler, stream=stats).sort_stats("tottime").print_stats(top)
    table = _table(prof, tokens)
    tok_s = statistics.median(rates)
    python = profiled_ms - sum(r["op_ms"] for r in table.values())
    result = {"model": str(path), "dtype": str(model.decoder.dtype).removeprefix("torch."),
              "tok_s": tok_s, "tok_s_min_max": [min(rates), max(rates)],
              "profiled_ms_per_token": profiled_ms, "categories": table, "python_ms_per_token": python,
              "torch_threads": torch.get_num_threads(), "compiled": compile_dense, "first_call_s": first_s}
    _print(result)
    print(stats.getvalue())
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2))
    return result


def _print(r: dict) -> None:
    from rich.table import Table

    from offload.bench.table import print_table

    lo, hi = r["tok_s_min_max"]
    table = Table(title=f"CPU decode step, {r['model']} ({r['dtype']}, resident), {r['torch_threads']} threads: "
                        f"{r['tok_s']:.2f} tok/s ({lo:.2f}-{hi:.2f}), {1e3 / r['tok_s']:.2f} ms/token unprofiled"
                        f"{', torch.compile' if r['compiled'] else ''}; first prefill + token {r['first_call_s']:.1f} s")
    for col in ("category", "torch ops/token", "ms/token (profiled)", "of which torch ops"):
        table.add_column(col)
    for name, c in r["categories"].items():
        table.add_row(name, f"{c['ops']:.0f}", f"{c['ms']:.2f}", f"{c['op_ms']:.2f}")
    total_ops = sum(c["ops"] for c in r["categories"].values())
    total_ms = sum(c["op_ms"] for c in r["categories"].values())
    table.add_row("total", f"{total_ops:.0f}", f"{r['profiled_ms_per_token']:.2f}", f"{total_ms:.2f}")
    table.add_row("Python between ops (profiled ms - torch ops)", "-", f"{r['python_ms_per_token']:.2f}", "-")
    print_table(table)
