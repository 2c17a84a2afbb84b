"""hqq and bitsandbytes, imported on first use, quietly and without a network attempt.

Both are heavy to import (hqq pulls in torch._dynamo: ~2 s), so nothing imports them until a weight is
quantized with them. bitsandbytes, on a CPU with AVX-512 BF16, tries at import to download a CPU kernel from
the model hub through Hugging Face's `kernels` package, and logs a warning when that fails. A local model
must never cause a network attempt, so while bitsandbytes is imported `kernels` is hidden from it (it then
keeps its own CPU kernel, its documented fallback) and that module's logger is muted. Its x86-64 CPU library is
built for AVX2: on an older CPU it dies of SIGILL, so there it is refused with an error instead.
"""
from __future__ import annotations

import importlib
import logging
import platform
import sys
from functools import cache
from types import ModuleType

import torch

from offload.errors import OffloadError

_HUB_KERNELS = "kernels"
_BNB_CPU_OPS = "bitsandbytes.backends.cpu.ops"  # the module that reaches for the hub kernel


def bitsandbytes_runs_here() -> bool:
    """False on an x86-64 CPU without AVX2 (CPUID, whatever ATEN_CPU_CAPABILITY says)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True
    has_avx2 = getattr(torch.cpu, "_is_avx2_supported", None)
    return has_avx2 is None or bool(has_avx2())


@cache
def bitsandbytes() -> ModuleType:
    """The `bitsandbytes` package (with `.functional`), imported without reaching for the model hub."""
    if not bitsandbytes_runs_here():
        raise OffloadError("NF4 weights need bitsandbytes, whose x86-64 CPU library needs AVX2, and this CPU has "
                           "no AVX2: use an HQQ preset instead (quant='a4e4')")
    hidden = sys.modules.get(_HUB_KERNELS)
    logger = logging.getLogger(_BNB_CPU_OPS)
    muted = logger.disabled
    sys.modules[_HUB_KERNELS] = None  # `from kernels import get_kernel` now raises ImportError
    logger.disabled = True
    try:
        return importlib.import_module("bitsandbytes")
    finally:
        logger.disabled = muted
        if hidden is None:
            del sys.modules[_HUB_KERNELS]
        else:
            sys.modules[_HUB_KERNELS] = hidden


@cache
def hqq_quantizer() -> type:
    """hqq's `Quantizer` (its half-quadratic optimizer)."""
    return importlib.import_module("hqq.core.quantize").Quantizer
