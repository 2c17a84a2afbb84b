"""Kernel benchmark: quantization error vs hqq, CPU batch-1 GEMV speed (quantized and dense), a whole MoE
layer's experts (our fused call vs one expert at a time), effective bits.

Weights are rotated through >= 1 GB so the last-level cache cannot hold them; timings are
medians of >= 5 passes in one process, next to the measured streaming-read bandwidth. "ours" runs
the CPU path chosen now: MOE_OFFLOAD_ISA=avx2|avx512|portable picks one (offload.kernels.native).
"""
from __future__ import annotations

import json
import statistics
import time
from typing import Callable

import torch

import torch.nn.functional as F

from offload.kernels import fused_moe, native, prepare, qmatmul
from offload.kernels.dense import dense_linear
from offload.kernels.cpu import Int4PackWeight, TileWeight, int4pack_weight
from offload.quant import PRESETS, QuantizedTensor, hqq_reference, quantize
from offload.quant.layout import padded_rows
from offload.quant.mxfp4 import from_mxfp4

SHAPE = (4096, 14336)
MOE_SHAPE = (1024, 512, 64, 8)  # OLMoE-1B-7B: hidden, expert width, experts, top-k
HQQ_SETTINGS = {2: 32, 3: 64, 4: 64}  # bits -> group size, as in the presets
ROTATE_BYTES = 1 << 30


def _median_ms(fn: Callable[[object], object], items: list, runs: int) -> float:
    fn(items[0])
    passes = []
    for _ in range(runs):
        t = time.perf_counter()
        for it in items:
            fn(it)
        passes.append((time.perf_counter() - t) / len(items))
    return statistics.median(passes) * 1e3


def stream_bandwidth_gbs(nbytes: int, runs: int = 5) -> float:
    """Streaming-read bandwidth: a sum over a tensor much larger than the cache."""
    big = torch.ones(nbytes // 4)
    ms = _median_ms(lambda t: t.sum(), [big], runs)
    return nbytes / ms / 1e6


def random_hqq(bits: int, group: int, shape: tuple[int, int]) -> QuantizedTensor:
    """An HQQ weight with random codes/metadata: speed does not depend on the values."""
    n, k = shape
    tiles, groups = padded_rows(n) // 64, n * k // group
    t = {"qweight": torch.randint(0, 256, (tiles, 2, k, 16) if bits == 4 else (tiles, k, 16), dtype=torch.uint8)}
    if bits == 3:
        t["qhigh"] = torch.randint(0, 256, (tiles, k, 8), dtype=torch.uint8)
    for m in ("scale", "zero"):
        t[f"{m}_q"] = torch.randint(0, 256, (groups,), dtype=torch.uint8)
        t[f"{m}_affine"] = torch.rand(-(-groups // 128), 2) * 1e-3
    return QuantizedTensor("hqq", shape, {"bits": bits, "group_size": group, "axis": 1, "meta_bits": 8,
                                          "meta_group": 128}, t)


def random_mxfp4(shape: tuple[int, int], seed: int = 0) -> QuantizedTensor:
    """An MXFP4 weight (gpt-oss experts' format) with random codes and scales near 1."""
    n, k = shape
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (n, k // 32, 16), generator=g, dtype=torch.uint8)
    return from_mxfp4(blocks, torch.randint(118, 130, (n, k // 32), generator=g, dtype=torch.uint8))


def _copies(nbytes: int, rotate: int) -> int:
    return max(2, -(-rotate // nbytes))


def _bytes_read(p: TileWeight | Int4PackWeight) -> int:
    """Code bytes + bf16 (s, z') pairs: what one product reads."""
    codes = p.packed if isinstance(p, TileWeight) else p.nibbles
    return codes.numel() + p.scale_zeros.numel() * 2


def quality(shape: tuple[int, int]) -> dict:
    torch.manual_seed(0)
    w = torch.randn(*shape) * 0.02
    rel = lambda a: float((a.float() - w).norm() / w.norm())  # noqa: E731
    out = {}
    for bits, g in HQQ_SETTINGS.items():
        qt = quantize(w, bits, g)
        ours, ref = rel(qt.dequantize(torch.float32)), rel(hqq_reference(w, bits, g))
        out[f"hqq{bits}-g{g}"] = {"ours": ours, "hqq": ref, "ratio": ours / ref, "bits_per_param": qt.bits_per_param}
    nf4 = quantize(w, 4, 64, fmt="nf4")
    out["nf4-b64"] = {"ours": rel(nf4.dequantize(torch.float32)), "bits_per_param": nf4.bits_per_param}
    return out


def speed(shape: tuple[int, int], rotate: int, runs: int, rows: int = 1) -> dict:
    """Every kernel's rotation set is built first; then the kernels take turns, one timed pass each per
    round, and each reports its median pass: a slow spell of a shared machine then hits all of them alike
    instead of whichever kernel it happened to overlap, so the ratios stay honest."""
    n, k = shape
    x = torch.randn(rows, k, dtype=torch.bfloat16)
    cases: dict[str, tuple[Callable, list]] = {}
    res: dict[str, dict] = {}

    def add(name: str, fn: Callable, items: list, bytes_each: int, stored_each: int) -> None:
        cases[name] = (fn, items)
        res[name] = {"copies": len(items), "bytes_read": bytes_each, "stored_bytes": stored_each}

    for name, dtype, size in (("bf16", torch.bfloat16, 2), ("fp32", torch.float32, 4)):
        xd = x.to(dtype)
        dense = [torch.randn(n, k, dtype=dtype) for _ in range(_copies(n * k * size, rotate))]
        add(f"dense-{name}", lambda w, xd=xd: F.linear(xd, w), dense, n * k * size, n * k * size)
        add(f"ours-dense-{name}", lambda w, xd=xd: dense_linear(xd, w), dense, n * k * size, n * k * size)
    nf4_one = quantize(torch.randn(n, k), 4, 64, fmt="nf4")
    nf4 = [QuantizedTensor(nf4_one.fmt, nf4_one.shape, nf4_one.params,
                           {a: b.clone() for a, b in nf4_one.tensors.items()})
           for _ in range(_copies(nf4_one.nbytes, rotate))]
    add("bnb-nf4", lambda q: qmatmul(x, q), nf4, nf4_one.nbytes, nf4_one.nbytes)
    for bits, g in HQQ_SETTINGS.items():
        stored = random_hqq(bits, g, shape)
        raw = [random_hqq(bits, g, shape) for _ in range(2)]
        t = time.perf_counter()
        prepared = [prepare(q) for q in raw]
        prep_ms = (time.perf_counter() - t) / 2 * 1e3
        read = _bytes_read(prepared[0])
        prepared += [prepare(random_hqq(bits, g, shape)) for _ in range(_copies(read, rotate) - 2)]
        add(f"ours-hqq{bits}-g{g}", lambda p: p.matmul(x), prepared, read, stored.nbytes)
        res[f"ours-hqq{bits}-g{g}"]["prepare_ms"] = prep_ms
        if bits == 4:  # torch's own kernel, on its layout for this CPU (what "ours" is on the portable path)
            torch_forms = [int4pack_weight(random_hqq(bits, g, shape)) for _ in range(len(prepared))]
            add("torch-int4pack-4bit", lambda p: p.matmul(x), torch_forms, _bytes_read(torch_forms[0]), stored.nbytes)
        raw = [random_hqq(bits, g, shape) for _ in range(_copies(stored.nbytes, rotate))]
        # a raw QuantizedTensor: prepared at its first call (the warm-up round), then kept on it
        add(f"ours-hqq{bits}-g{g}-unprepared", lambda q: qmatmul(x, q), raw, stored.nbytes, stored.nbytes)
    stored = random_mxfp4(shape)
    if native.gemv() is not None:  # our GEMV on the e2m1 codes (gpt-oss experts)
        prepared = [prepare(random_mxfp4(shape, seed)) for seed in range(_copies(stored.nbytes, rotate))]
        read = _bytes_read(prepared[0])
    else:  # dequantized per call: compute-bound, so two copies do
        prepared, read = [prepare(random_mxfp4(shape, seed)) for seed in range(2)], stored.nbytes
    add("ours-mxfp4", lambda p: p.matmul(x), prepared, read, stored.nbytes)
    return _interleaved(cases, res, runs)


def _interleaved(cases: dict[str, tuple[Callable, list]], res: dict[str, dict], runs: int) -> dict[str, dict]:
    """Time the cases in turns, one pass over its items each per round (round 0 warms up); medians into `res`."""
    passes: dict[str, list[float]] = {name: [] for name in cases}
    for round_ in range(runs + 1):
        for name, (fn, items) in cases.items():
            t = time.perf_counter()
            for it in items:
                fn(it)
            if round_:
                passes[name].append((time.perf_counter() - t) / len(items) * 1e3)
    for name, ms in passes.items():
        median = statistics.median(ms)
        res[name].update(ms=median, passes_ms=ms, gbs=res[name]["bytes_read"] / median / 1e6)
    return res


def _expert(form: str, hidden: int, inner: int, seed: int) -> dict:
    """One expert's gate/up/down in `form` ("bf16" or "hqq4", prepared as the engine prepares them)."""
    shapes = {"gate": (inner, hidden), "up": (inner, hidden), "down": (hidden, inner)}
    if form == "bf16":
        return {name: torch.randn(*s, dtype=torch.bfloat16) / s[1] ** 0.5 for name, s in shapes.items()}
    return {name: prepare(random_hqq(4, 64, s)) for name, s in shapes.items()}


def _project(v: torch.Tensor, w) -> torch.Tensor:
    return F.linear(v, w) if isinstance(w, torch.Tensor) else qmatmul(v, w)


def _per_expert(x: torch.Tensor, experts: list[dict], counts: list[int]) -> torch.Tensor:
    """The path before the fused call: three products and SwiGLU per expert, F.linear for dense weights."""
    outputs, start = [], 0
    for w, n in zip(experts, counts):
        rows = x[start:start + n]
        outputs.append(_project(F.silu(_project(rows, w["gate"])) * _project(rows, w["up"]), w["down"]))
        start += n
    return torch.cat(outputs)


def moe_layer_speed(rows: int, rotate: int, runs: int, shape: tuple[int, int, int, int] = MOE_SHAPE) -> dict:
    """One MoE layer's experts for `rows` tokens routed top-k at random: our fused call vs the per-expert path
    before it, per form, side by side; layers rotated through `rotate` bytes. GB/s counts each hit expert's
    bytes once."""
    hidden, inner, n_experts, top_k = shape
    gemv = native.gemv()
    cases: dict[str, tuple[Callable, list]] = {}
    res: dict[str, dict] = {}
    g = torch.Generator().manual_seed(0)
    for form in ("bf16", "hqq4"):
        one = _expert(form, hidden, inner, 0)
        per_expert = sum(_bytes_read(t) if isinstance(t, TileWeight) else t.nbytes for t in one.values())
        layers = []
        for layer in range(_copies(per_expert * n_experts, rotate)):
            experts = [_expert(form, hidden, inner, layer * n_experts + i) for i in range(n_experts)]
            ids = torch.stack([torch.randperm(n_experts, generator=g)[:top_k] for _ in range(rows)])
            hit, counts = torch.unique(ids, return_counts=True)
            chosen = [experts[i] for i in hit.tolist()]
            x = torch.randn(int(counts.sum()), hidden, dtype=torch.bfloat16)
            layers.append((x, chosen, counts.tolist()))
        read = per_expert * statistics.mean(len(c) for _, c, _ in layers)
        stored = per_expert * n_experts
        cases[f"per-expert-{form}"] = (lambda it: _per_expert(*it), layers)
        res[f"per-expert-{form}"] = {"copies": len(layers), "bytes_read": read, "stored_bytes": stored}
        if gemv is not None:
            def fused(it, gemv=gemv):
                x, chosen, counts = it
                descs = [fused_moe.descriptor(w, gemv, hidden, inner) for w in chosen]
                return fused_moe.run(x, descs, counts, inner, False, 1.702, 7.0, gemv)
            cases[f"ours-fused-{form}"] = (fused, layers)
            res[f"ours-fused-{form}"] = dict(res[f"per-expert-{form}"])
    return _interleaved(cases, res, runs)


def run(json_out: str | None = None, quick: bool = False, speed_only: bool = False, rows: int = 1) -> dict:
    """Run the kernel benchmark; print tables; return (and optionally write) the JSON. `speed_only` skips
    the quantization-error half (hqq's optimizer is slow); `rows` is the GEMV's batch (1: decode; 2-8:
    speculative verify or a small batch)."""
    shape = (512, 1024) if quick else SHAPE
    gemv_shape = (1024, 4096) if quick else SHAPE
    rotate, runs = (64 << 20, 3) if quick else (ROTATE_BYTES, 5)
    gemv = native.gemv()
    result = {"shape": list(gemv_shape), "rows": rows, "threads": torch.get_num_threads(),
              "cpu_path": gemv.isa if gemv else "portable",
              "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "stream_read_gbs": stream_bandwidth_gbs(4 * rotate if not quick else rotate),
              "gemv": speed(gemv_shape, rotate, runs, rows),
              "moe_shape": list(MOE_SHAPE[:2] if not quick else (256, 128)) + list(MOE_SHAPE[2:]),
              "moe_layer": moe_layer_speed(rows, rotate, runs, MOE_SHAPE if not quick else (256, 128, 64, 8))}
    g = result["gemv"]
    base = g["ours-hqq4-g64"]["ms"]
    result["ratios"] = {"ours4_vs_nf4": base / g["bnb-nf4"]["ms"], "ours4_vs_dense": base / g["dense-bf16"]["ms"],
                        "ours2_vs_ours4": g["ours-hqq2-g32"]["ms"] / base, "ours3_vs_ours4": g["ours-hqq3-g64"]["ms"] / base,
                        "ours4_roofline": g["ours-hqq4-g64"]["gbs"] / result["stream_read_gbs"],
                        "dense_bf16_ours_vs_torch": g["ours-dense-bf16"]["ms"] / g["dense-bf16"]["ms"],
                        "dense_bf16_roofline": g["ours-dense-bf16"]["gbs"] / result["stream_read_gbs"]}
    for form in ("bf16", "hqq4"):
        if f"ours-fused-{form}" in result["moe_layer"]:
            result["ratios"][f"moe_{form}_fused_vs_per_expert"] = (result["moe_layer"][f"ours-fused-{form}"]["ms"]
                                                                    / result["moe_layer"][f"per-expert-{form}"]["ms"])
    if not speed_only:
        result["quality_shape"] = list(shape)
        result["quality"] = quality(shape)
        result["preset_bits_per_param"] = {name: {role: p.spec(role).bits_per_param(SHAPE)
                                                  for role in ("attention", "expert", "shared_expert", "dense_mlp")}
                                           for name, p in PRESETS.items()}
    _print(result)
    if json_out:
        with open(json_out, "w") as f:
            json.dump(result, f, indent=2)
    return result


def _print(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from offload.bench.table import print_table

    console = Console()
    if "quality" in result:
        shape = result["quality_shape"]
        t = Table(title=f"Quantization error vs hqq ({shape[0]}x{shape[1]})")
        for c in ("format", "ours", "hqq", "ours/hqq", "bits/param"):
            t.add_column(c)
        for name, q in result["quality"].items():
            t.add_row(name, f"{q['ours']:.4f}", f"{q.get('hqq', float('nan')):.4f}",
                      f"{q.get('ratio', float('nan')):.4f}", f"{q['bits_per_param']:.3f}")
        print_table(t, console)
    t = Table(title=f"CPU GEMV, {result['rows']} x {'x'.join(map(str, result['shape']))}, {result['threads']} threads, "
                    f"stream read {result['stream_read_gbs']:.1f} GB/s, path {result['cpu_path']} "
                    f"(torch: {result['torch_cpu_capability']})")
    for c in ("kernel", "ms (median)", "GB/s read", "stored MB", "prepare ms", "copies"):
        t.add_column(c)
    for name, r in result["gemv"].items():
        t.add_row(name, f"{r['ms']:.2f}", f"{r['gbs']:.1f}", f"{r['stored_bytes'] / 1e6:.1f}",
                  f"{r['prepare_ms']:.0f}" if "prepare_ms" in r else "", str(r["copies"]))
    print_table(t, console)
    h, f, e, k = result["moe_shape"]
    t = Table(title=f"One MoE layer, {result['rows']} token(s), hidden {h}, expert width {f}, {e} experts top-{k}")
    for c in ("path", "ms (median)", "GB/s read", "copies"):
        t.add_column(c)
    for name, r in result["moe_layer"].items():
        t.add_row(name, f"{r['ms']:.3f}", f"{r['gbs']:.1f}", str(r["copies"]))
    print_table(t, console)
    console.print("ratios: " + json.dumps({k: round(v, 3) for k, v in result["ratios"].items()}))
    for name, roles in result.get("preset_bits_per_param", {}).items():
        console.print(f"preset {name}: " + ", ".join(f"{r} {b:.3f}" for r, b in roles.items()) + " bit/param")
