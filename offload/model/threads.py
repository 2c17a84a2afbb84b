"""Torch threads for a model whose matrices are all small: one.

A CPU decode step of the demo model is ~60 products with matrices of 128-256 KB. Splitting one across
threads costs more in wake-ups than it saves (x[1,128] @ W[128,256]^T: 6 us on one thread, 11 us on two,
measured on the 2-core development VM), and when another process holds a core a split product stalls: the
same product with 2 rows took 9 us on one thread and 750 us on two. Large models keep torch's setting: their
products stream megabytes, and every core adds read bandwidth.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import torch

SMALL_MATRIX_BYTES = 1 << 20


def threads_for(tensors: Iterable[object], device: torch.device) -> int:
    """1 on a CPU when no 2-D tensor among `tensors` exceeds SMALL_MATRIX_BYTES, else 0 (leave torch's setting)."""
    if device.type != "cpu":
        return 0
    sizes = [t.nbytes for t in tensors if isinstance(t, torch.Tensor) and t.dim() == 2]
    return 1 if sizes and max(sizes) <= SMALL_MATRIX_BYTES else 0


def with_threads(method: Callable) -> Callable:
    """Run a method with `self.threads` torch threads (0: as set), restoring the caller's setting after."""

    @functools.wraps(method)
    def run(self, *args, **kwargs):
        if not self.threads:
            return method(self, *args, **kwargs)
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return method(self, *args, **kwargs)
        finally:
            torch.set_num_threads(previous)

    return run
