"""offload-bench fuzz: property-based fuzzing (hypothesis) of the parsers of files users hand us.

Every case must end in success with exactly the weights of the undamaged files, or in a clean OffloadError:
one line, naming one of the target's files; never another exception, a wrong weight, a hang or a memory
spike. Targets are pluggable by name (`register`): `prepare` writes the undamaged input once, `cases` is a
hypothesis strategy of damages, `run` applies one and loads (raising WrongAnswer when the load succeeds with
other weights). A module `offload/bench/<name>_fuzz.py` that registers a target is found by the bench on its own.
The test suite runs a few hundred cases per target; `offload-bench fuzz` runs as many as asked.
"""
from __future__ import annotations

import importlib
import json
import os
import pkgutil
import resource
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as with_seed
from hypothesis import strategies as st

from ..errors import OffloadError

MEMORY_SPIKE_MB = 256  # a case that raises the peak RSS by more than this allocated what a file claimed
TIMEOUT = "no result within the time limit"


class WrongAnswer(AssertionError):
    """A damaged file loaded without an error and gave other weights than the undamaged one."""


@dataclass
class Context:
    """What a target's cases share: the model directory they damage, the undamaged bytes of its files (restored
    before every case), the names one of which a clean error must mention, and the reference weights."""
    path: Path
    pristine: dict[str, bytes]
    names: tuple[str, ...]
    reference: dict[str, torch.Tensor]
    fifos: tuple[Path, ...] = ()  # opened for writing when a case hangs, so that a reader blocked on one returns
    extra: dict[str, Any] = field(default_factory=dict)

    def restore(self) -> None:
        for name, data in self.pristine.items():
            (self.path / name).write_bytes(data)


@dataclass
class Target:
    prepare: Callable[[Path], Context]
    cases: Callable[[Context], st.SearchStrategy]
    run: Callable[[Context, Any], None]


TARGETS: dict[str, Target] = {}


def register(name: str, prepare: Callable[[Path], Context], cases: Callable[[Context], st.SearchStrategy],
             run: Callable[[Context, Any], None]) -> None:
    """Add a fuzz target (`offload-bench fuzz --target NAME`)."""
    TARGETS[name] = Target(prepare, cases, run)


def targets() -> dict[str, Target]:
    """Every target: this module's and those the `*_fuzz` modules of offload.bench register."""
    from offload import bench

    for info in pkgutil.iter_modules(bench.__path__, "offload.bench."):
        if info.name.endswith("_fuzz"):
            importlib.import_module(info.name)
    return TARGETS


@dataclass
class Report:
    target: str
    cases: int
    failures: list[tuple[str, str]]  # (case, what went wrong)
    seconds: float
    peak_rss_mb: float
    stalls: int  # cases over the time limit that ran in time when run again: the machine stalled, not the parser


class _Timeout(Exception):
    pass


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _raise_timeout(*_) -> None:
    raise _Timeout


def _release(fifos: tuple[Path, ...]) -> None:
    for fifo in fifos:
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # nobody is reading it
            pass


def check_case(target: Target, ctx: Context, case: Any, limit: float = 10.0) -> str | None:
    """None when the case ended well (right weights or a clean error), else what went wrong."""
    ctx.restore()
    rss, start = _peak_rss_mb(), time.perf_counter()
    previous = signal.signal(signal.SIGALRM, _raise_timeout)  # interrupts Python code
    watchdog = threading.Timer(limit, _release, (ctx.fifos,))  # unblocks native code waiting on a FIFO
    signal.setitimer(signal.ITIMER_REAL, limit)
    watchdog.start()
    try:
        target.run(ctx, case)
        failure = None
    except OffloadError as e:
        message = str(e)
        clean = message and "\n" not in message and any(name in message for name in ctx.names)
        failure = None if clean else f"unclear error {type(e).__name__}: {message[:300]!r}"
    except _Timeout:
        failure = TIMEOUT
    except WrongAnswer as e:
        failure = f"wrong answer: {e}"
    except Exception as e:  # noqa: BLE001 - any other exception is the finding
        failure = f"{type(e).__name__}: {str(e)[:300]}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        watchdog.cancel()
    if failure is None and time.perf_counter() - start > limit:  # native code the alarm could not interrupt
        failure = TIMEOUT
    if failure is None and _peak_rss_mb() - rss > MEMORY_SPIKE_MB:
        failure = f"peak memory rose by {_peak_rss_mb() - rss:.0f} MB"
    return failure


def fuzz(name: str, cases: int, seed: int = 0, limit: float = 10.0, batch: int = 1000) -> Report:
    """Run `cases` cases of target `name` (in batches of fresh hypothesis runs, which keeps its memory flat). A
    case over the time limit runs once more: a parser that hangs hangs again, a busy machine rarely stalls twice."""
    target = targets()[name]
    failures: list[tuple[str, str]] = []
    count = stalls = 0

    def one(case) -> None:
        nonlocal count, stalls
        count += 1
        failure = check_case(target, ctx, case, limit)
        if failure == TIMEOUT and check_case(target, ctx, case, limit) is None:
            stalls += 1
        elif failure:
            failures.append((repr(case)[:500], failure))

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="offload-fuzz-") as work:
        ctx = target.prepare(Path(work))
        strategy = target.cases(ctx)
        round_ = 0
        while count < cases:
            before, round_ = count, round_ + 1
            run = settings(max_examples=min(batch, cases - count), database=None, deadline=None,
                           phases=[Phase.generate], suppress_health_check=list(HealthCheck))(given(strategy)(one))
            with_seed(seed * 100003 + round_)(run)()
            if count == before:  # the strategy has no new cases left
                break
    return Report(name, count, failures, time.perf_counter() - start, _peak_rss_mb(), stalls)


def run(names: list[str], cases: int, seed: int = 0, limit: float = 10.0, json_out: Path | None = None
        ) -> list[Report]:
    """offload-bench fuzz: `cases` cases shared evenly by the targets `names` ("all": every target)."""
    available = targets()
    names = sorted(available) if names == ["all"] else names
    unknown = sorted(set(names) - set(available))
    if unknown:
        raise ValueError(f"unknown fuzz target(s) {unknown}; choose from {sorted(available)} or all")
    reports = []
    for i, name in enumerate(names):
        share = cases // len(names) + (i < cases % len(names))
        report = fuzz(name, share, seed, limit)
        reports.append(report)
        print(f"{name:12} {report.cases:7d} cases  {len(report.failures):5d} failures  {report.seconds:7.0f} s  "
              f"peak RSS {report.peak_rss_mb:.0f} MB  ({report.stalls} stalls)", flush=True)
        for case, failure in report.failures[:5]:
            print(f"    {failure[:200]}\n      case: {case[:200]}")
    if json_out:
        json_out.write_text(json.dumps([vars(r) for r in reports], indent=1))
    return reports


# ---- damages ----

JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
                    | st.text(max_size=12), lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
NUMBERS = st.sampled_from([0, 1, -1, 255, 256, 4096, -4096, 2**31, 2**32, 2**63, 2**64]) | st.integers(-2**40, 2**40)


def byte_damage(size: int, start: int = 0, end: int | None = None) -> st.SearchStrategy:
    """One damage to a file of `size` bytes, within [start, end) where it changes bytes."""
    end = size if end is None else end
    pos = st.integers(start, max(start, end - 1))
    return st.one_of(
        st.tuples(st.just("xor"), st.lists(st.tuples(pos, st.integers(1, 255)), min_size=1, max_size=4)),
        st.tuples(st.just("truncate"), st.integers(0, max(0, size - 1))),
        st.tuples(st.just("append"), st.binary(min_size=1, max_size=64)),
        st.tuples(st.just("overwrite"), st.tuples(pos, st.binary(min_size=1, max_size=16))),
    )


def damaged(data: bytes, damage: tuple) -> bytes:
    kind, arg = damage
    if kind == "xor":
        out = bytearray(data)
        for pos, mask in arg:
            if pos < len(out):
                out[pos] ^= mask
        return bytes(out)
    if kind == "truncate":
        return data[:arg]
    if kind == "append":
        return data + arg
    pos, new = arg
    return data[:pos] + new + data[pos + len(new):]


def _equal_or_raise(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    if sorted(got) != sorted(want):
        raise WrongAnswer(f"tensors {sorted(set(got) ^ set(want))[:4]} differ in presence")
    for key, tensor in want.items():
        if got[key].dtype != tensor.dtype or not torch.equal(got[key], tensor):
            raise WrongAnswer(f"{key} differs")


# ---- the checkpoint the targets damage: a tiny Qwen3-MoE written by transformers ----

TINY = dict(vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            head_dim=8, intermediate_size=32, moe_intermediate_size=8, num_experts=4, num_experts_per_tok=2,
            norm_topk_prob=True, max_position_embeddings=64, bos_token_id=None, eos_token_id=None, pad_token_id=0)


def save_tiny(path: Path, max_shard_size: str | None = None) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen3_moe", **TINY), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.1)
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))


def loaded_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every weight as the streaming loader returns it, by canonical name."""
    from ..loader import load_spec, load_weights

    path, _, spec, adapter = load_spec(path)
    weights = load_weights(path, spec, adapter, torch.float32, torch.device("cpu"))
    experts = {f"layers.{layer}.experts.{e}.{role}": t for (layer, e), roles in weights.experts.items()
               for role, t in roles.items()}
    return weights.dense | experts | {"mtp." + k: v for k, v in weights.mtp.items()}


def model_weights(model) -> dict[str, torch.Tensor]:
    """Every weight a loaded model computes with, by canonical name."""
    d = model.decoder
    out = {"embed": d.embed, "norm": d.norm, "lm_head": d.lm_head}
    for i, layer in enumerate(d.layers):
        for part, value in layer.items():
            items = value.items() if isinstance(value, dict) else [(None, value)]
            out |= {".".join(filter(None, (f"layers.{i}", part, key))): t for key, t in items}
    for (layer, e), roles in d.experts.experts.items():
        out |= {f"layers.{layer}.experts.{e}.{role}": t for role, t in roles.items()}
    return out


# ---- target "safetensors": the header of a shard ----

def _prepare_safetensors(work: Path) -> Context:
    path = work / "model"
    save_tiny(path)
    data = (path / "model.safetensors").read_bytes()
    return Context(path, {"model.safetensors": data}, ("model.safetensors", str(path)), loaded_weights(path),
                   extra={"header": json.loads(data[8: 8 + int.from_bytes(data[:8], "little")])})


def _safetensors_cases(ctx: Context) -> st.SearchStrategy:
    data = ctx.pristine["model.safetensors"]
    header = ctx.extra["header"]
    names = sorted(k for k in header if k != "__metadata__")
    field_value = st.one_of(
        st.tuples(st.just("dtype"), st.sampled_from(["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8",
                                                     "U16", "U32", "U64", "BOOL", "F8_E4M3", "F8_E5M2", "f32", ""])),
        st.tuples(st.just("shape"), st.lists(NUMBERS, max_size=3)),
        st.tuples(st.just("data_offsets"), st.lists(NUMBERS, max_size=3)),
        st.tuples(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]), JSON),
    )
    return st.one_of(
        st.tuples(st.just("bytes"), byte_damage(len(data), 0, 8 + int.from_bytes(data[:8], "little"))),
        st.tuples(st.just("field"), st.tuples(st.sampled_from(names), field_value)),
        st.tuples(st.just("entry"), st.tuples(st.sampled_from(names), JSON)),
        st.tuples(st.just("header"), JSON),
        st.tuples(st.just("same"), st.tuples(st.randoms(use_true_random=False), st.integers(0, 64))),
    )


def _run_safetensors(ctx: Context, case) -> None:
    kind, arg = case
    file = ctx.path / "model.safetensors"
    data = ctx.pristine["model.safetensors"]
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8: 8 + n])
    if kind == "bytes":
        file.write_bytes(damaged(data, arg))
    else:
        if kind == "field":
            name, (key, value) = arg
            header[name][key] = value
        elif kind == "entry":
            header[arg[0]] = arg[1]
        elif kind == "header":
            header = arg
        else:  # the same tensors in another key order, padded with spaces: must load the same
            items = list(header.items())
            arg[0].shuffle(items)
            header = dict(items)
        text = json.dumps(header).encode() + b" " * (arg[1] if kind == "same" else 0)
        file.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n:])
    _equal_or_raise(loaded_weights(ctx.path), ctx.reference)


register("safetensors", _prepare_safetensors, _safetensors_cases, _run_safetensors)


# ---- target "index": model.safetensors.index.json and what it may name ----

INDEX = "model.safetensors.index.json"


def _prepare_index(work: Path) -> Context:
    path = work / "model"
    save_tiny(path, max_shard_size="20KB")
    shards = sorted(p.name for p in path.glob("*.safetensors"))
    outside = work / "outside"
    outside.mkdir()
    (outside / shards[0]).write_bytes((path / shards[0]).read_bytes())
    (path / "sub").mkdir()
    (path / "sub" / shards[0]).write_bytes((path / shards[0]).read_bytes())
    (path / "copy.safetensors").write_bytes((path / shards[0]).read_bytes())
    (path / "link.safetensors").symlink_to(outside / shards[0])
    (path / "dangling.safetensors").symlink_to(work / "nowhere")
    os.mkfifo(path / "pipe.safetensors")
    pool = shards + [f"../outside/{shards[0]}", str(outside / shards[0]), f"sub/{shards[0]}", "sub", "", ".", "..",
                     "copy.safetensors", "link.safetensors", "dangling.safetensors", "pipe.safetensors",
                     "missing.safetensors", "a\x00b.safetensors", "x" * 300, "/dev/zero", "/proc/self/mem"]
    return Context(path, {INDEX: (path / INDEX).read_bytes()}, (INDEX, str(path), *shards, *pool[len(shards):]),
                   loaded_weights(path), (path / "pipe.safetensors",), extra={"pool": pool})


def _index_cases(ctx: Context) -> st.SearchStrategy:
    index = json.loads(ctx.pristine[INDEX])
    names = sorted(index["weight_map"])
    value = st.sampled_from(ctx.extra["pool"]) | JSON
    return st.one_of(
        st.tuples(st.just("entries"), st.lists(st.tuples(st.sampled_from(names), value), min_size=1, max_size=4)),
        st.tuples(st.just("weight_map"), JSON),
        st.tuples(st.just("document"), JSON),
        st.tuples(st.just("bytes"), byte_damage(len(ctx.pristine[INDEX]))),
    )


def _run_index(ctx: Context, case) -> None:
    kind, arg = case
    file = ctx.path / INDEX
    if kind == "bytes":
        file.write_bytes(damaged(ctx.pristine[INDEX], arg))
    else:
        index = json.loads(ctx.pristine[INDEX])
        if kind == "entries":
            index["weight_map"] |= dict(arg)
        elif kind == "weight_map":
            index["weight_map"] = arg
        else:
            index = arg
        file.write_text(json.dumps(index))
    _equal_or_raise(loaded_weights(ctx.path), ctx.reference)


register("index", _prepare_index, _index_cases, _run_index)


# ---- target "packed": experts.json, experts.bin and dense.safetensors of an offload-convert output ----

PACKED = ("experts.json", "experts.bin", "dense.safetensors")


def _prepare_packed(work: Path) -> Context:
    from offload import load
    from offload.packed import convert

    save_tiny(work / "model")
    path = convert(work / "model", work / "packed")
    return Context(path, {name: (path / name).read_bytes() for name in PACKED}, PACKED,
                   {k: v.clone() for k, v in model_weights(load(path, device="cpu")).items()})


def _packed_cases(ctx: Context) -> st.SearchStrategy:
    meta = json.loads(ctx.pristine["experts.json"])
    keys = sorted(meta["experts"])
    entry = st.tuples(st.sampled_from(keys), st.integers(0, 2), NUMBERS | JSON)
    return st.one_of(
        st.sampled_from(PACKED).flatmap(lambda name: st.tuples(st.just(name), byte_damage(len(ctx.pristine[name])))),
        st.tuples(st.just("entry"), st.lists(entry, min_size=1, max_size=3)),
        st.tuples(st.just("swap"), st.tuples(st.sampled_from(keys), st.sampled_from(keys))),
        st.tuples(st.just("meta"), st.tuples(st.sampled_from(sorted(meta) + ["other"]), NUMBERS | JSON)),
    )


def _run_packed(ctx: Context, case) -> None:
    from offload import load

    kind, arg = case
    if kind in PACKED:
        (ctx.path / kind).write_bytes(damaged(ctx.pristine[kind], arg))
    else:
        meta = json.loads(ctx.pristine["experts.json"])
        if kind == "entry":
            for key, i, value in arg:
                if i < len(meta["experts"][key]):
                    meta["experts"][key][i] = value
        elif kind == "swap":
            meta["experts"][arg[0]], meta["experts"][arg[1]] = meta["experts"][arg[1]], meta["experts"][arg[0]]
        else:
            meta[arg[0]] = arg[1]
        (ctx.path / "experts.json").write_text(json.dumps(meta))
    _equal_or_raise(model_weights(load(ctx.path, device="cpu")), ctx.reference)


register("packed", _prepare_packed, _packed_cases, _run_packed)
