"""Streaming-read memory bandwidth, the roofline of a decode step that reads its weights once per token.

    python -m offload.bench.bandwidth THREADS  ->  GB/s (best of several sums over a buffer far larger than L3)
"""
from __future__ import annotations

import sys
import time

import torch


def read_bandwidth(threads: int, nbytes: int = 1 << 30, reps: int = 5) -> float:
    """Bytes/s of torch's sum over `nbytes` of float32 on `threads` threads (best of reps, after a warm-up)."""
    torch.set_num_threads(threads)
    buf = torch.ones(nbytes // 4)
    buf.sum()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


if __name__ == "__main__":
    print(read_bandwidth(int(sys.argv[1])) / 1e9)
