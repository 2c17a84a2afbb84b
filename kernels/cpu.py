"""CPU path: HQQ 2/3/4-bit (axis=1) and MXFP4 on our tile layout, read by our GEMV; a portable path elsewhere.

Our tiles (offload.quant.layout, FORMAT.md) are the bytes we store; torch's `_weight_int4pack_mm_for_cpu`
packs a layout of its own that depends on the CPU (AVX2: 32-row blocks, AVX-512: 64-row blocks), so nothing
here assumes the two agree. With our GEMV (offload.kernels.native: AVX2 or AVX-512 build) the prepared form
is a TileWeight: 4-bit and 2-bit tiles as stored, 3-bit ones converted to 4-bit tiles (two masks), MXFP4's
e2m1 codes regrouped into the 4-bit tiles. Without it (no AVX2, no compiler, arm64, MOE_OFFLOAD_NATIVE=0)
HQQ codes go through torch's own packer once, exactly, into an Int4PackWeight for torch's kernel, and MXFP4
is dequantized per call (offload.kernels.dispatch.DequantWeight).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from offload.kernels import native
from offload.quant.hqq import hqq_scale_zero
from offload.quant.layout import pack_codes, padded_rows, unpack_codes
from offload.quant.tensor import QuantizedTensor

INT4_GROUPS = (32, 64, 128, 256)
_M2 = 0x3333333333333333  # 2-bit codes -> nibbles, 8 bytes at a time
_M1 = 0x1111111111111111  # 1-bit high plane -> bit 2 of each nibble
_NIBBLE = 0x1111111111111111  # times an offset: add it to every nibble


def _offset(bits: int) -> int:
    """Codes are kept in nibbles as q + offset, centred on 8 (int4pack's convention): keeps z' small in bf16."""
    return 8 - 2 ** (bits - 1)


@dataclass
class TileWeight:
    """Prepared form for our GEMV: code tiles + bf16 (scale, offset) pairs [K/g, N_pad, 2].

    codes "int4": our 4-bit tiles [N_pad, K/2] (HQQ 4-bit as stored, 3-bit converted), w = (code - 8) * s + z'.
    codes "int2": the stored HQQ 2-bit tiles [N_pad/64, K, 16], w = (code - 2) * s + z', read as they are:
    half the bytes of nibbles in RAM and per call. codes "fp4": MXFP4's e2m1 codes in the 4-bit tiles,
    w = 2 * value(code) * s with s = 2^(e - 128) per 32 columns.

    Our GEMV serves every M (two or four rows per pass over the weight). Measured for 4096x14336, 2 threads,
    AMD EPYC AVX-512 (BENCHMARKS.md): the AVX-512 build beat torch's int4pack kernel (on its own layout,
    converted once) from M = 9 to 128 (4.0 vs 4.8 ms at 9, 40 vs 53 ms at 128); at M = 512 runs disagreed
    (248 vs 182 ms, 328 vs 653 ms). With torch limited to AVX2 (ATEN_CPU_CAPABILITY=avx2) its kernel was
    slower than our AVX2 build at every M (M = 512: 740 vs 592 ms). The alternatives lost: torch's layout
    cached beside ours doubles a 4-bit weight's RAM, converting it per call costs 0.2-0.3 s, dequantizing
    per call 0.25-0.7 s, and a bf16 GEMM with oneDNN limited to AVX2 took 5.5 s at M = 16.
    """

    packed: torch.Tensor
    scale_zeros: torch.Tensor
    group_size: int
    out_features: int
    codes: str
    gemv: native.Gemv

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        a = x.reshape(-1, x.shape[-1]).to(torch.float32).contiguous()
        y = self.gemv(a, self.packed, self.codes, self.scale_zeros, self.group_size)
        return y[:, : self.out_features].to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def stacked_rows(parts: list) -> TileWeight | None:
    """One TileWeight computing the rows of every part in turn (q, k and v: one GEMV call for three), or None
    unless all are TileWeights of one kind whose rows fill their tiles (all but the last: no padding rows in
    between). Each row's tiles and (scale, offset) pairs are the part's own, so its results do not change."""
    if not all(isinstance(p, TileWeight) for p in parts):
        return None
    first = parts[0]
    if any((p.codes, p.group_size, p.gemv, p.packed.shape[1:], p.scale_zeros.shape[0]) !=
           (first.codes, first.group_size, first.gemv, first.packed.shape[1:], first.scale_zeros.shape[0])
           for p in parts) or any(p.out_features % 64 for p in parts[:-1]):
        return None
    return TileWeight(torch.cat([p.packed for p in parts]), torch.cat([p.scale_zeros for p in parts], 1),
                      first.group_size, sum(p.out_features for p in parts[:-1]) + parts[-1].out_features,
                      first.codes, first.gemv)


@dataclass
class Int4PackWeight:
    """Portable prepared form: torch's int4pack bytes for this CPU + the same (s, z') pairs, for torch's
    kernel (bf16 activations), w = (nibble - 8) * s + z'."""

    nibbles: torch.Tensor
    scale_zeros: torch.Tensor
    group_size: int
    out_features: int

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        a = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(a, self.nibbles, self.group_size, self.scale_zeros)
        return y[:, : self.out_features].to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def prepare_cpu(qt: QuantizedTensor) -> TileWeight | Int4PackWeight | None:
    """The CPU form of `qt` for the GEMV build chosen now (native.gemv()), or None where only
    dequantize-and-matmul serves (other HQQ groupings; MXFP4 without our GEMV)."""
    gemv = native.gemv()
    if qt.fmt == "mxfp4":
        return _fp4_tiles(qt, gemv) if gemv is not None else None
    if not (qt.fmt == "hqq" and qt.params["axis"] == 1 and qt.params["group_size"] in INT4_GROUPS):
        return None
    if gemv is None:
        return int4pack_weight(qt)
    packed, codes = _our_tiles(qt)
    return TileWeight(packed, _scale_zeros(qt), int(qt.params["group_size"]), qt.shape[0], codes, gemv)


def int4pack_weight(qt: QuantizedTensor) -> Int4PackWeight:
    """An HQQ axis=1 weight (group in INT4_GROUPS) for torch's kernel: our tiles unpacked and repacked into
    torch's layout for this CPU by torch's own packer (exact; ~0.2-0.3 s for 4096x14336, so once, at prepare)."""
    codes = unpack_codes(qt.tensors, qt.bits, qt.shape[1]) + _offset(qt.bits)
    nibbles = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.int(), 1)
    return Int4PackWeight(nibbles, _scale_zeros(qt), int(qt.params["group_size"]), qt.shape[0])


def _our_tiles(qt: QuantizedTensor) -> tuple[torch.Tensor, str]:
    """The tiles our GEMV reads: 4-bit and 2-bit as stored (views, no copy), 3-bit as 4-bit tiles."""
    bits, k = qt.bits, qt.shape[1]
    q = qt.tensors["qweight"]
    if bits == 4:
        return q.view(-1, k // 2), "int4"
    if bits == 2:
        return q.view(-1, k, 16), "int2"
    return _nibbles_from_tiles(q.view(-1, k, 16), qt.tensors["qhigh"]), "int4"


def _nibbles_from_tiles(q: torch.Tensor, qhigh: torch.Tensor) -> torch.Tensor:
    """Our 4-bit tiles [N_pad, K/2] from our 3-bit tiles: the 2-bit plane [T, K, 16] gives the two nibble
    halves with two masks, the high plane [T, K, 8] adds bit 2."""
    tiles, k = q.shape[0], q.shape[1]
    q64 = q.reshape(tiles, -1).view(torch.int64)
    out = torch.empty(tiles, 2, k * 16, dtype=torch.uint8)
    o64 = out.view(torch.int64)
    torch.bitwise_and(q64, _M2, out=o64[:, 0])
    torch.bitwise_and(q64 >> 2, _M2, out=o64[:, 1])
    d64 = qhigh.reshape(tiles, -1).view(torch.int64)  # [T, K]: 8 bytes per column
    halves = o64.view(tiles, 2, k, 2)
    for h in range(2):
        for m in range(2):
            halves[:, h, :, m] |= ((d64 >> (2 * h + m)) & _M1) << 2
    o64 += _NIBBLE * _offset(3)
    return out.view(-1, k // 2)


def _scale_zeros(qt: QuantizedTensor) -> torch.Tensor:
    """bf16 (s, z') pairs [K/g, N_pad, 2] with w = (code - 2^(bits-1)) * s + z', i.e. z' = (2^(bits-1) - zero) * s:
    the same pairs serve nibbles (code + offset - 8) and 2-bit codes as they are."""
    n, k = qt.shape
    g, bits = int(qt.params["group_size"]), qt.bits
    scale, zero = (t.view(n, k // g) for t in hqq_scale_zero(qt))
    sz = torch.zeros(k // g, padded_rows(n), 2, dtype=torch.bfloat16)
    sz[:, :n, 0] = scale.t()
    sz[:, :n, 1] = ((2.0 ** (bits - 1) - zero) * scale).t()
    return sz


def _fp4_tiles(qt: QuantizedTensor, gemv: native.Gemv) -> TileWeight:
    """MXFP4's codes regrouped into our 4-bit tiles (no value changes: the GEMV decodes e2m1 by table, as
    2 * value), its E8M0 scales as bf16 powers of two, halved to undo that 2."""
    n, k = qt.shape
    blocks, scales = qt.tensors["blocks"], qt.tensors["scales"]
    nibbles = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).view(n, k)  # low nibble = even column
    packed = pack_codes(nibbles, 4)["qweight"].view(-1, k // 2)
    sz = torch.zeros(k // 32, padded_rows(n), 2, dtype=torch.bfloat16)
    exponent = scales.t().to(torch.int32) - 128
    sz[:, :n, 0] = torch.ldexp(torch.ones(exponent.shape), exponent).to(torch.bfloat16)
    return TileWeight(packed, sz, 32, n, "fp4", gemv)
