"""GPU kernel benchmark (needs CUDA): the Triton dequant-matmul kernels against torch's bf16 matmul on one
Mixtral expert matrix, and the host<->device copies that move experts.

Decode (M = 1, 8) and prefill (M = 512) shapes; every weight set rotates through >= 1 GB so the L2 cache
(50-60 MB on Hopper) cannot hold it; the cases take turns round by round and each reports the median of
its rounds, timed with CUDA events. Each kernel is first checked against x @ dequantize(W)^T in fp32.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Callable

import torch

from offload.bench.kernels import HQQ_SETTINGS, SHAPE, random_hqq
from offload.kernels import prepare
from offload.kernels.triton.qmm import qmm_kernel
from offload.quant import QuantizedTensor, from_mxfp4

ROTATE_BYTES = 1 << 30
ROWS = (1, 8, 512)


def _events_ms(fn: Callable[[object], object], items: list) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for it in items:
        fn(it)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / len(items)


def read_bandwidth_gbs(nbytes: int = 4 << 30, runs: int = 10) -> float:
    """Device-memory streaming read: a sum over a tensor far larger than L2."""
    big = torch.ones(nbytes // 4, device="cuda")
    big.sum()
    return nbytes / statistics.median(_events_ms(lambda t: t.sum(), [big]) for _ in range(runs)) / 1e6


def random_mxfp4(shape: tuple[int, int]) -> QuantizedTensor:
    n, k = shape
    return from_mxfp4(torch.randint(0, 256, (n, k // 32, 16), dtype=torch.uint8),
                      torch.randint(120, 128, (n, k // 32), dtype=torch.uint8))


def _kernel_bytes(prep) -> int:
    """Bytes the Triton kernel reads per call: packed codes plus its fp32 metadata."""
    w = prep.weight
    tensors = {id(t): t for t in w.operands()}.values()
    return sum(t.numel() * t.element_size() for t in tensors)


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).norm() / ref.norm())


def kernels(shape: tuple[int, int] = SHAPE, rotate: int = ROTATE_BYTES, runs: int = 10) -> dict:
    n, k = shape
    formats: dict[str, Callable[[], QuantizedTensor]] = {
        f"hqq{bits}-g{g}": (lambda b=bits, g=g: random_hqq(b, g, shape)) for bits, g in HQQ_SETTINGS.items()}
    formats["mxfp4"] = lambda: random_mxfp4(shape)
    cases: dict[str, tuple[Callable, list, int]] = {}
    result: dict[str, dict] = {}
    dense = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
             for _ in range(max(2, -(-rotate // (n * k * 2))))]
    xs = {m: torch.randn(m, k, dtype=torch.bfloat16, device="cuda") for m in ROWS}
    for m in ROWS:
        cases[f"dense-bf16 M={m}"] = (lambda w, x=xs[m]: x @ w.t(), dense, n * k * 2)
    for name, make in formats.items():
        first = make().to("cuda")
        prep = prepare(first, backend="triton")
        ref_w = first.dequantize(torch.float32)
        nbytes = _kernel_bytes(prep)
        copies = max(1, -(-rotate // nbytes) - 1)
        weights = [prep] + [prepare(make().to("cuda"), backend="triton") for _ in range(copies)]
        for m in ROWS:
            x = xs[m]
            err = _rel_err(prep.matmul(x), x.float() @ ref_w.t())
            result[f"{name} M={m}"] = {"rel_err_vs_dequant_fp32": err}
            cases[f"{name} M={m}"] = (lambda p, x=x: p.matmul(x), weights, nbytes)
        del ref_w
    passes: dict[str, list[float]] = {name: [] for name in cases}
    for round_ in range(runs + 1):  # round 0: autotuning and warm-up
        for name, (fn, items, _) in cases.items():
            ms = _events_ms(fn, items)
            if round_:
                passes[name].append(ms)
    for name, (_, items, nbytes) in cases.items():
        ms = statistics.median(passes[name])
        m = int(name.rsplit("=", 1)[1])
        result.setdefault(name, {}).update(ms=ms, passes_ms=passes[name], copies=len(items), bytes_read=nbytes,
                                           gbs=nbytes / ms / 1e6, tflops=2 * m * n * k / ms / 1e9)
    for name, r in result.items():
        r["vs_dense"] = r["ms"] / result[f"dense-bf16 M={name.rsplit('=', 1)[1]}"]["ms"]
    return result


def copies(nbytes: int = 64 << 20, runs: int = 10) -> dict:
    """Host<->device copy bandwidth for one expert-sized blob: pinned vs pageable, each direction."""
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    out = {}
    for label, host in (("pinned", torch.ones(nbytes, dtype=torch.uint8).pin_memory()),
                        ("pageable", torch.ones(nbytes, dtype=torch.uint8))):
        for direction, (dst, src) in (("h2d", (dev, host)), ("d2h", (host, dev))):
            ms = statistics.median(_events_ms(lambda _, d=dst, s=src: d.copy_(s, non_blocking=True), [None])
                                   for _ in range(runs + 1))
            out[f"{label}-{direction}"] = {"ms": ms, "gbs": nbytes / ms / 1e6}
    return out


def run(json_out: str | None = None, quick: bool = False) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("offload-bench gpu-kernels needs a CUDA GPU; on the CPU use offload-bench kernels")
    shape = (1024, 4096) if quick else SHAPE
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": list(shape),
              "read_gbs": read_bandwidth_gbs(1 << 30 if quick else 4 << 30),
              "gemm": kernels(shape, (64 << 20) if quick else ROTATE_BYTES, 3 if quick else 10),
              "autotuned": {str(key): str(config) for key, config in qmm_kernel.cache.items()},
              "copies": copies((8 << 20) if quick else (64 << 20))}
    _print(result)
    if json_out:
        Path(json_out).write_text(json.dumps(result, indent=2))
    return result


def _print(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from offload.bench.table import print_table

    console = Console()
    t = Table(title=f"{result['device']}: x[M,{result['shape'][1]}] @ W^T, W {result['shape'][0]}x"
                    f"{result['shape'][1]}; device read {result['read_gbs']:.0f} GB/s")
    for c in ("kernel", "ms (median)", "vs dense", "GB/s read", "of read bw", "TFLOP/s", "rel err"):
        t.add_column(c)
    for name, r in sorted(result["gemm"].items(), key=lambda p: (int(p[0].rsplit("=", 1)[1]), p[0])):
        err = r.get("rel_err_vs_dequant_fp32")
        t.add_row(name, f"{r['ms']:.4f}", f"{r['vs_dense']:.2f}x", f"{r['gbs']:.0f}",
                  f"{r['gbs'] / result['read_gbs']:.0%}", f"{r['tflops']:.1f}", "" if err is None else f"{err:.1e}")
    print_table(t, console)
    for key, config in result["autotuned"].items():
        console.print(f"GEMV config {key}: {config}")
    console.print("copies: " + ", ".join(f"{k} {v['gbs']:.1f} GB/s" for k, v in result["copies"].items()))
