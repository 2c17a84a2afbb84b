"""Our CPU kernels (q_gemv.c: quantized and dense GEMV, the fused MoE layer, decode attention), compiled on first use with the system C compiler, once per instruction set.

One small C file needs no build system: `cc -O3 -fopenmp -shared` takes about a second. It is built for
AVX2 + FMA (8-float vectors) or AVX-512 F/BW/VL (16-float vectors: the same source with -DVEC=16), the best
one this CPU runs unless MOE_OFFLOAD_ISA says otherwise (avx2 | avx512 | portable; MOE_OFFLOAD_NATIVE=0 is
"portable"). Builds are cached under ~/.cache/moe-offload (or $MOE_OFFLOAD_CACHE), written to a temporary
name and then renamed, keyed by a hash of the source and the whole command, so the two builds never
collide. Calls go through ctypes, which releases the GIL. Without a compiler, on a CPU without AVX2/FMA,
when the build fails, or when "portable" is asked for, there is no kernel and the caller takes the
portable path (offload.kernels.cpu); the reason is logged once.
"""
from __future__ import annotations

import ctypes
from array import array
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("q_gemv.c")
COMMON_FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC")
LIBS = ("-lm",)
ISA_FLAGS = {"avx2": ("-mavx2", "-mfma", "-DVEC=8"),
             "avx512": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma", "-DVEC=16")}
CHOICES = (*ISA_FLAGS, "portable")
log = logging.getLogger(__name__)


def cache_dir() -> Path:
    root = os.environ.get("MOE_OFFLOAD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "moe-offload")
    return Path(root) / "kernels"


@lru_cache(maxsize=1)
def cpu_isas() -> tuple[str, ...]:
    """The builds this CPU can run, best last. torch's capability check covers what they use (its AVX512
    level needs F, BW, VL, DQ and FMA)."""
    return {"AVX512": ("avx2", "avx512"), "AVX2": ("avx2",)}.get(torch.backends.cpu.get_cpu_capability(), ())


def chosen_isa() -> str | None:
    """The build the environment asks for, else the best this CPU has; None = portable path."""
    if os.environ.get("MOE_OFFLOAD_NATIVE", "1") == "0":
        return None
    asked = os.environ.get("MOE_OFFLOAD_ISA", "").lower()
    if asked and asked not in CHOICES:
        raise ValueError(f"MOE_OFFLOAD_ISA={asked!r}: use one of {list(CHOICES)}")
    if asked:
        return None if asked == "portable" else asked
    return cpu_isas()[-1] if cpu_isas() else None


def _compile(compiler: str, isa: str) -> Path:
    command = (compiler, *COMMON_FLAGS, *ISA_FLAGS[isa])
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(command + LIBS).encode()).hexdigest()[:16]
    target = cache_dir() / f"q_gemv-{isa}-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            subprocess.run([*command, str(SOURCE), "-o", tmp, *LIBS], check=True, capture_output=True, text=True)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return target


@dataclass(frozen=True)
class Gemv:
    """One loaded build of q_gemv.c."""

    isa: str
    lib: ctypes.CDLL

    def __call__(self, x: torch.Tensor, packed: torch.Tensor, codes: str, scale_zeros: torch.Tensor,
                 group_size: int) -> torch.Tensor:
        """x float32 [M, K] (contiguous) -> float32 [M, n_pad]; packed (tiles of `codes`: "int4", "int2" or
        "fp4") and scale_zeros as in offload.kernels.cpu.TileWeight. Any M (2 or 4 rows per pass)."""
        m, k = x.shape
        n_pad = scale_zeros.shape[1]
        y = torch.empty(m, n_pad, dtype=torch.float32)
        xsum = torch.empty(m, k // group_size, dtype=torch.float32)
        if codes == "fp4":
            self.lib.fp4_gemv(x.data_ptr(), m, k, packed.data_ptr(), scale_zeros.data_ptr(), n_pad, group_size,
                              xsum.data_ptr(), y.data_ptr())
        else:
            self.lib.q_gemv(x.data_ptr(), m, k, packed.data_ptr(), 2 if codes == "int2" else 4,
                            scale_zeros.data_ptr(), n_pad, group_size, xsum.data_ptr(), y.data_ptr())
        return y

    def dense(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x float32 [M, K] (contiguous) @ w.T (+ bias) -> float32 [M, N]; w bf16 or float32 [N, K] contiguous,
        bias bf16 or float32 [N]. Each weight row is read once per 8 rows of x."""
        m, k = x.shape
        y = torch.empty(m, w.shape[0], dtype=torch.float32)
        self.lib.dense_gemv(x.data_ptr(), m, k, w.data_ptr(), w.dtype == torch.bfloat16, w.shape[0],
                            bias.data_ptr() if bias is not None else None,
                            bias is not None and bias.dtype == torch.bfloat16, y.data_ptr())
        return y

    def moe_layer(self, x: torch.Tensor, descriptors: list[list[int]], starts: list[int], inner: int,
                  clamped: bool, alpha: float, limit: float, out_stride: int) -> torch.Tensor:
        """Every expert of a MoE layer in one call (see moe_layer in q_gemv.c): x float32 [P, H], rows grouped
        by expert (expert i: rows starts[i] .. starts[i + 1]), descriptors: 24 int64 per expert ->
        float32 [P, out_stride]. Small arrays go as array.array buffers: tensors or ctypes arrays built from
        lists cost more than the call itself."""
        p, h = x.shape
        out = torch.empty(p, out_stride, dtype=torch.float32)
        flat, rows = array("q", [v for d in descriptors for v in d]), array("i", starts)
        if self.lib.moe_layer(len(descriptors), flat.buffer_info()[0], rows.buffer_info()[0], x.data_ptr(), h, inner,
                              int(clamped), alpha, limit, out.data_ptr(), out_stride):
            raise MemoryError("moe_layer: no memory for its scratch buffers")
        return out


    def moe_pairs(self, x: torch.Tensor, ids: torch.Tensor, table: array, experts: int, inner: int, clamped: bool,
                  alpha: float, limit: float, out_stride: int) -> torch.Tensor:
        """Every (token, expert) pair of a routed layer (see moe_pairs in q_gemv.c): x float32 [N, H]
        contiguous, ids int64 [N, k] contiguous, table: 24 int64 per expert for all `experts` ->
        float32 [N * k, out_stride] in pair order."""
        n, h = x.shape
        out = torch.empty(ids.numel(), out_stride, dtype=torch.float32)
        if self.lib.moe_pairs(experts, table.buffer_info()[0], ids.numel(), ids.shape[1], ids.data_ptr(),
                              x.data_ptr(), h, inner, int(clamped), alpha, limit, out.data_ptr(), out_stride):
            raise MemoryError("moe_pairs: no memory for its scratch buffers")
        return out

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocked: torch.Tensor,
                  sinks: torch.Tensor | None, scale: float) -> torch.Tensor:
        """Decode attention (decode_attention in q_gemv.c): q float32 [B, Hq, T, D] contiguous; k [B, Hkv, S, D]
        and v [B, Hkv, S, Dv] of one dtype, bf16 or float32, rows contiguous; blocked uint8 [B, T, S] contiguous
        (1: may not attend); sinks float32 [Hq] or None -> float32 [B, T, Hq, Dv]."""
        b, hq, t, d = q.shape
        hkv, s, dv = k.shape[1], k.shape[2], v.shape[3]
        scores = torch.empty(b, hq, t, s, dtype=torch.float32)
        out = torch.empty(b, t, hq, dv, dtype=torch.float32)
        self.lib.decode_attention(b, hq, hkv, t, s, d, dv, q.data_ptr(), k.data_ptr(), v.data_ptr(),
                                  k.dtype == torch.bfloat16, *k.stride()[:3], *v.stride()[:3], blocked.data_ptr(),
                                  None if sinks is None else sinks.data_ptr(), scale, scores.data_ptr(),
                                  out.data_ptr())
        return out


@lru_cache(maxsize=None)
def build(isa: str) -> Gemv | None:
    """The `isa` build ("avx2" | "avx512"), or None (the reason logged once) when it cannot run here."""
    if isa not in cpu_isas():
        log.warning("native GEMV off: this CPU cannot run the %s build (torch reports %s); using the portable path",
                    isa, torch.backends.cpu.get_cpu_capability())
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        log.warning("native GEMV off: no C compiler (set CC); using the portable path")
        return None
    try:
        lib = ctypes.CDLL(str(_compile(compiler, isa)))
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or err
        log.warning("native GEMV off: building %s failed (%s); using the portable path", SOURCE.name, detail)
        return None
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.q_gemv.argtypes = (p, i, i, p, i, p, i, i, p, p)
    lib.q_gemv.restype = None
    lib.fp4_gemv.argtypes = (p, i, i, p, p, i, i, p, p)
    lib.fp4_gemv.restype = None
    lib.dense_gemv.argtypes = (p, i, i, p, i, i, p, i, p)
    lib.dense_gemv.restype = None
    f = ctypes.c_float
    lib.moe_layer.argtypes = (i, p, p, p, i, i, i, f, f, p, i)
    lib.moe_layer.restype = i
    lib.moe_pairs.argtypes = (i, p, i, i, p, p, i, i, i, f, f, p, i)
    lib.moe_pairs.restype = i
    n = ctypes.c_long
    lib.decode_attention.argtypes = (i, i, i, i, i, i, i, p, p, p, i, n, n, n, n, n, n, p, p, f, p, p)
    lib.decode_attention.restype = None
    return Gemv(isa, lib)


def gemv() -> Gemv | None:
    """The build to use now (chosen_isa), or None for the portable path."""
    isa = chosen_isa()
    if isa is None and not cpu_isas():
        _log_no_isa()
    return build(isa) if isa else None


@lru_cache(maxsize=1)
def _log_no_isa() -> None:
    log.info("native GEMV off: this CPU has no AVX2; using the portable path")
