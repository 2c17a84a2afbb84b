"""Give memory a load freed back to the OS: glibc keeps freed heap pages (a 4-bit load's 16-bit weights, the
copies a pack made) in its arenas, so the process would keep the RSS of its peak until it exits."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None (musl, macOS, Windows: nothing to call, their allocators differ)."""
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim") if name else None
    except (OSError, AttributeError):
        return None


def release_freed(collect: bool = True) -> None:
    """Collect garbage (unless told not to), then hand the allocator's free pages back to the OS (glibc:
    malloc_trim(0))."""
    if collect:
        gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class Trimmer:
    """Trims the heap every `every` bytes a load reads or frees: a load that frees what it reads (quantizing,
    packing) interleaves those frees with what it keeps, so glibc's heap only grows (its top is never free) and
    the load's peak would be the sum of both, not what it keeps. A trim costs ~2 ms on a 1 GB heap."""

    def __init__(self, every: int = 8 << 20) -> None:
        self.every, self.since = every, 0

    def read(self, nbytes: int) -> None:
        """`nbytes` more were read or freed."""
        self.since += nbytes
        if self.since >= self.every:
            release_freed(collect=False)
            self.since = 0
