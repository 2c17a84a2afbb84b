"""The hand-written AVX2 GEMV (q_gemv.c), compiled on first use with the system C compiler.

One small C file needs no build system: `cc -O3 -mavx2 -mfma -fopenmp -shared` takes under a second, the
library is cached under ~/.cache/moe-offload (written to a temporary name, then renamed) keyed by a hash
of the source and the command, and called through ctypes, which releases the GIL for the call. Without a
compiler, on a CPU without AVX2/FMA, or with MOE_OFFLOAD_NATIVE=0, `library()` is None and the caller
keeps torch's int4pack kernel; the reason is logged once.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("q_gemv.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
MAX_ROWS = 8  # x rows (tokens) per call; larger batches are GEMMs, where torch's int4pack kernel is good
log = logging.getLogger(__name__)


def cache_dir() -> Path:
    root = os.environ.get("MOE_OFFLOAD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "moe-offload")
    return Path(root) / "kernels"


def _compile(compiler: str) -> Path:
    command = (compiler, *FLAGS)
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(command).encode()).hexdigest()[:16]
    target = cache_dir() / f"q_gemv-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            subprocess.run([*command, str(SOURCE), "-o", tmp], check=True, capture_output=True, text=True)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled kernel, or None (with the reason logged) when it cannot be had here."""
    if os.environ.get("MOE_OFFLOAD_NATIVE", "1") == "0":
        return None
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        log.info("native GEMV off: this CPU has no AVX2")
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        log.warning("native GEMV off: no C compiler (set CC); using torch's int4pack kernel")
        return None
    try:
        lib = ctypes.CDLL(str(_compile(compiler)))
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or err
        log.warning("native GEMV off: building %s failed (%s); using torch's int4pack kernel", SOURCE.name, detail)
        return None
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.q_gemv.argtypes = (p, i, i, p, i, p, i, i, p, p)
    lib.q_gemv.restype = None
    lib.fp4_gemv.argtypes = (p, i, i, p, p, i, i, p, p)
    lib.fp4_gemv.restype = None
    return lib


def q_gemv(x: torch.Tensor, packed: torch.Tensor, codes: str, scale_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """x float32 [M, K] (contiguous) -> float32 [M, n_pad]; packed (tiles of `codes`: "int4", "int2" or "fp4")
    and scale_zeros as in offload.kernels.cpu.TileWeight. Any M works (two rows per pass over the weight);
    beyond MAX_ROWS, torch's int4pack GEMM is faster where it applies."""
    lib = library()
    m, k = x.shape
    n_pad = scale_zeros.shape[1]
    y = torch.empty(m, n_pad, dtype=torch.float32)
    xsum = torch.empty(m, k // group_size, dtype=torch.float32)
    if codes == "fp4":
        lib.fp4_gemv(x.data_ptr(), m, k, packed.data_ptr(), scale_zeros.data_ptr(), n_pad, group_size,
                     xsum.data_ptr(), y.data_ptr())
    else:
        lib.q_gemv(x.data_ptr(), m, k, packed.data_ptr(), 2 if codes == "int2" else 4, scale_zeros.data_ptr(),
                   n_pad, group_size, xsum.data_ptr(), y.data_ptr())
    return y
