#!/usr/bin/env python
"""Our GEMV's builds side by side in one process (AVX2 and, where the CPU has it, AVX-512), with dense bf16:
which build pays on this machine. `offload-bench kernels` runs one path per process (MOE_OFFLOAD_ISA), so on
a shared VM its runs of different builds meet different neighbours; here every build reads the same
prepared tiles, rotated through >= 1 GB, and the cases take turns pass by pass (median of --runs passes).

    .venv/bin/python scripts/cpu_builds_bench.py --rows 1,2,8 --runs 9
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from offload.bench.kernels import HQQ_SETTINGS, SHAPE, ROTATE_BYTES, _bytes_read, _copies, random_hqq, random_mxfp4
from offload.kernels import native
from offload.kernels.cpu import TileWeight, prepare_cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default="1", help="comma-separated x rows (M)")
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    builds = [native.build(isa) for isa in native.cpu_isas()]
    n, k = SHAPE
    cases = {}
    makers = {f"hqq{b}-g{g}": (lambda s, b=b, g=g: random_hqq(b, g, SHAPE)) for b, g in HQQ_SETTINGS.items()}
    makers["mxfp4"] = lambda s: random_mxfp4(SHAPE, s)
    for name, make in makers.items():
        first = prepare_cpu(make(0))
        assert isinstance(first, TileWeight), "no native build here"
        tiles = [first] + [prepare_cpu(make(s)) for s in range(1, _copies(_bytes_read(first), ROTATE_BYTES))]
        for gemv in builds:
            for m in rows:
                x = torch.randn(m, k)
                cases[f"{name} M={m} {gemv.isa}"] = (
                    lambda w, gemv=gemv, x=x: gemv(x, w.packed, w.codes, w.scale_zeros, w.group_size), tiles)
    dense = [torch.randn(n, k, dtype=torch.bfloat16) for _ in range(_copies(n * k * 2, ROTATE_BYTES))]
    for m in rows:
        xb = torch.randn(m, k, dtype=torch.bfloat16)
        cases[f"dense-bf16 M={m}"] = (lambda w, xb=xb: xb @ w.t(), dense)
    passes: dict[str, list[float]] = {c: [] for c in cases}
    for round_ in range(args.runs + 1):  # round 0 warms up
        for c, (fn, items) in cases.items():
            t = time.perf_counter()
            for it in items:
                fn(it)
            if round_:
                passes[c].append((time.perf_counter() - t) / len(items) * 1e3)
    print(f"{n}x{k}, {args.threads} threads, torch capability {torch.backends.cpu.get_cpu_capability()}, "
          f"median of {args.runs} passes (min-max)")
    for c, ms in passes.items():
        print(f"{c:28s} {statistics.median(ms):8.2f} ms  ({min(ms):.2f}-{max(ms):.2f})")


if __name__ == "__main__":
    main()
