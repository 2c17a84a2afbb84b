"""CPU path: HQQ 2/3/4-bit (axis=1) on our AVX2 GEMV and torch's int4pack kernel.

Our 4-bit tile layout *is* the AVX2 layout of torch's `aten._weight_int4pack_mm_for_cpu`, so
4-bit needs no conversion. Our GEMV also reads the stored 2-bit tiles as they are; 3-bit
codes (and 2-bit ones where that GEMV is unavailable) become int4pack bytes with two masks
(see offload.quant.layout) in the prepared (compute-slot) copy. Decode-sized inputs
(<= 8 rows) run our GEMV (offload.kernels.native, ~2x torch's kernel at M = 1); larger
ones, and CPUs where torch packs another layout (AVX-512: 64-row blocks, reached by an
exact conversion through torch's own packer), run torch's kernel.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from offload.kernels import native
from offload.quant.hqq import hqq_scale_zero
from offload.quant.layout import TILE_N, pack_codes, padded_rows, unpack_codes
from offload.quant.tensor import QuantizedTensor

INT4_GROUPS = (32, 64, 128, 256)
_M2 = 0x3333333333333333  # 2-bit codes -> nibbles, 8 bytes at a time
_M1 = 0x1111111111111111  # 1-bit high plane -> bit 2 of each nibble
_NIBBLE = 0x1111111111111111  # times an offset: add it to every nibble


def _offset(bits: int) -> int:
    """Codes are stored in nibbles as q + offset, centred on int4pack's 8: keeps z' small in bf16."""
    return 8 - 2 ** (bits - 1)


def supports_tiles(qt: QuantizedTensor) -> bool:
    """Can `to_tiles` prepare it: HQQ axis=1 at torch's int4pack group sizes, or MXFP4 where our GEMV runs."""
    if qt.fmt == "mxfp4":
        return _native()
    return qt.fmt == "hqq" and qt.params["axis"] == 1 and qt.params["group_size"] in INT4_GROUPS


@lru_cache(maxsize=1)
def _native_layout() -> bool:
    """Does torch's int4pack on this CPU use our tile layout? (AVX2 yes, AVX-512 no.)"""
    codes = torch.randint(0, 16, (TILE_N, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    ref = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.int(), 1)
    return torch.equal(ref.reshape(-1), pack_codes(codes, 4)["qweight"].reshape(-1))


def _native() -> bool:
    """Is our AVX2 GEMV available, on torch's AVX2 tile layout?"""
    return _native_layout() and native.library() is not None


@dataclass
class TileWeight:
    """Prepared form: code tiles + bf16 (scale, offset) pairs [K/g, N_pad, 2].

    codes "int4": int4pack nibbles [N_pad, K/2] (HQQ 4-bit, and 3-bit converted at prepare), w = (code - 8) * s + z'.
    codes "int2": the stored HQQ 2-bit tiles [N_pad/64, K, 16], w = (code - 2) * s + z'; our GEMV reads them
    directly, half the bytes of nibbles in RAM and per call. codes "fp4": MXFP4's e2m1 codes in the int4pack
    layout, w = 2 * value(code) * s with s = 2^(e - 128) per 32 columns; only our GEMV reads these.
    """

    packed: torch.Tensor
    scale_zeros: torch.Tensor
    group_size: int
    out_features: int
    codes: str = "int4"

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        a = x.reshape(-1, x.shape[-1])
        if self.codes == "fp4" or (a.shape[0] <= native.MAX_ROWS and _native()):  # no torch kernel takes FP4
            y = native.q_gemv(a.to(torch.float32).contiguous(), self.packed, self.codes, self.scale_zeros,
                              self.group_size)
        else:
            y = self.matmul_int4pack(a)
        return y[:, : self.out_features].to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def nibbles(self) -> torch.Tensor:
        """int4pack bytes [N_pad, K/2] (2-bit tiles are converted: a GEMM reads each byte many times)."""
        return self.packed if self.codes == "int4" else _nibbles_from_tiles(self.packed, None, 2)

    def matmul_int4pack(self, a: torch.Tensor) -> torch.Tensor:
        """torch's kernel on a 2-D input (bf16 activations), [M, N_pad] bf16 (HQQ codes only)."""
        return torch.ops.aten._weight_int4pack_mm_for_cpu(a.to(torch.bfloat16), self.nibbles(), self.group_size,
                                                          self.scale_zeros)


def _nibbles_from_tiles(q: torch.Tensor, qhigh: torch.Tensor | None, bits: int) -> torch.Tensor:
    """int4pack bytes [N_pad, K/2] from our 2/3-bit tiles [T, K, 16] (+ the 3-bit high plane [T, K, 8])."""
    tiles, k = q.shape[0], q.shape[1]
    q64 = q.reshape(tiles, -1).view(torch.int64)
    out = torch.empty(tiles, 2, k * 16, dtype=torch.uint8)
    o64 = out.view(torch.int64)
    torch.bitwise_and(q64, _M2, out=o64[:, 0])
    torch.bitwise_and(q64 >> 2, _M2, out=o64[:, 1])
    if bits == 3:
        d64 = qhigh.reshape(tiles, -1).view(torch.int64)  # [T, K]: 8 bytes per column
        halves = o64.view(tiles, 2, k, 2)
        for h in range(2):
            for m in range(2):
                halves[:, h, :, m] |= ((d64 >> (2 * h + m)) & _M1) << 2
    o64 += _NIBBLE * _offset(bits)
    return out.view(-1, k // 2)


def _codes(qt: QuantizedTensor) -> tuple[torch.Tensor, str]:
    """The tiles the prepared form keeps, and their codes: 2-bit tiles as stored when our GEMV reads
    them, else int4pack bytes [N_pad, K/2]."""
    bits, k = qt.bits, qt.shape[1]
    q = qt.tensors["qweight"]
    if not _native_layout():
        codes = unpack_codes(qt.tensors, bits, k) + _offset(bits)
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.int(), 1), "int4"
    if bits == 4:
        return q.view(-1, k // 2), "int4"
    if bits == 2 and _native():
        return q.view(-1, k, 16), "int2"
    return _nibbles_from_tiles(q.view(-1, k, 16), qt.tensors.get("qhigh"), bits), "int4"


def to_tiles(qt: QuantizedTensor) -> TileWeight:
    """Prepare an HQQ axis=1 or MXFP4 weight for our GEMV (and HQQ also for torch's int4pack kernel:
    w = (nibble - 8) * s + z', nibble = code + 8 - 2^(bits-1), so s and z' serve 2-bit codes as they are)."""
    if qt.fmt == "mxfp4":
        return _fp4_tiles(qt)
    n, k = qt.shape
    g, bits = int(qt.params["group_size"]), qt.bits
    packed, tile_codes = _codes(qt)
    scale, zero = (t.view(n, k // g) for t in hqq_scale_zero(qt))
    sz = torch.zeros(k // g, padded_rows(n), 2, dtype=torch.bfloat16)
    sz[:, :n, 0] = scale.t()
    sz[:, :n, 1] = ((2.0 ** (bits - 1) - zero) * scale).t()
    return TileWeight(packed, sz, g, n, tile_codes)


def _fp4_tiles(qt: QuantizedTensor) -> TileWeight:
    """MXFP4's codes regrouped into the int4pack tile layout (no value changes: the GEMV decodes e2m1 by
    table, as 2 * value), its E8M0 scales as bf16 powers of two, halved to undo that 2."""
    n, k = qt.shape
    blocks, scales = qt.tensors["blocks"], qt.tensors["scales"]
    nibbles = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).view(n, k)  # low nibble = even column
    packed = pack_codes(nibbles, 4)["qweight"].view(-1, k // 2)
    sz = torch.zeros(k // 32, padded_rows(n), 2, dtype=torch.bfloat16)
    exponent = scales.t().to(torch.int32) - 128
    sz[:, :n, 0] = torch.ldexp(torch.ones(exponent.shape), exponent).to(torch.bfloat16)
    return TileWeight(packed, sz, 32, n, "fp4")
