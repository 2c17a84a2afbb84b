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


def release_freed() -> None:
    """Collect garbage, then hand the allocator's free pages back to the OS (glibc: malloc_trim(0))."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
