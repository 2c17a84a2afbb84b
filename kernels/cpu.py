"""CPU path: HQQ 2/3/4-bit (axis=1) as int4pack tiles.

Our 4-bit tile layout *is* the AVX2 layout of torch's `aten._weight_int4pack_mm_for_cpu`, so
4-bit needs no conversion; 2/3-bit codes become int4pack bytes with two masks (see
offload.quant.layout), so the host store keeps 2/3-bit bytes and only the prepared
(compute-slot) copy is 4-bit. Decode-sized inputs (<= 8 rows) run our AVX2 GEMV
(offload.kernels.native, ~2x torch's kernel at M = 1); larger ones, and CPUs where torch
packs another layout (AVX-512: 64-row blocks, reached by an exact conversion through
torch's own packer), run torch's kernel.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from offload.kernels import native
from offload.quant.hqq import hqq_scale_zero
from offload.quant.layout import TILE_N, pack_codes, unpack_codes
from offload.quant.tensor import QuantizedTensor

INT4_GROUPS = (32, 64, 128, 256)
_M2 = 0x3333333333333333  # 2-bit codes -> nibbles, 8 bytes at a time
_M1 = 0x1111111111111111  # 1-bit high plane -> bit 2 of each nibble
_NIBBLE = 0x1111111111111111  # times an offset: add it to every nibble


def _offset(bits: int) -> int:
    """Codes are stored in nibbles as q + offset, centred on int4pack's 8: keeps z' small in bf16."""
    return 8 - 2 ** (bits - 1)


def supports_int4pack(qt: QuantizedTensor) -> bool:
    return qt.fmt == "hqq" and qt.params["axis"] == 1 and qt.params["group_size"] in INT4_GROUPS


@lru_cache(maxsize=1)
def _native_layout() -> bool:
    """Does torch's int4pack on this CPU use our tile layout? (AVX2 yes, AVX-512 no.)"""
    codes = torch.randint(0, 16, (TILE_N, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    ref = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.int(), 1)
    return torch.equal(ref.reshape(-1), pack_codes(codes, 4)["qweight"].reshape(-1))


@dataclass
class Int4PackWeight:
    """Prepared form: int4pack bytes [N_pad, K/2] + bf16 (scale, zero) [K/g, N_pad, 2]."""

    packed: torch.Tensor
    scale_zeros: torch.Tensor
    group_size: int
    out_features: int

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        a = x.reshape(-1, x.shape[-1])
        if a.shape[0] <= native.MAX_ROWS and _native_layout() and native.library() is not None:
            y = native.q4_gemv(a.to(torch.float32).contiguous(), self.packed, self.scale_zeros, self.group_size)
        else:
            y = self.matmul_int4pack(a)
        return y[:, : self.out_features].to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def matmul_int4pack(self, a: torch.Tensor) -> torch.Tensor:
        """torch's kernel on a 2-D input (bf16 activations), [M, N_pad] bf16."""
        return torch.ops.aten._weight_int4pack_mm_for_cpu(a.to(torch.bfloat16), self.packed, self.group_size,
                                                          self.scale_zeros)


def _nibbles(qt: QuantizedTensor) -> torch.Tensor:
    """int4pack bytes [N_pad, K/2] from our 2/3/4-bit tiles."""
    bits, k = qt.bits, qt.shape[1]
    q = qt.tensors["qweight"]
    if not _native_layout():
        codes = unpack_codes(qt.tensors, bits, k) + _offset(bits)
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.int(), 1)
    if bits == 4:
        return q.view(-1, k // 2)
    tiles = q.shape[0]
    q64 = q.reshape(tiles, -1).view(torch.int64)
    out = torch.empty(tiles, 2, k * 16, dtype=torch.uint8)
    o64 = out.view(torch.int64)
    torch.bitwise_and(q64, _M2, out=o64[:, 0])
    torch.bitwise_and(q64 >> 2, _M2, out=o64[:, 1])
    if bits == 3:
        d64 = qt.tensors["qhigh"].reshape(tiles, -1).view(torch.int64)  # [T, K]: 8 bytes per column
        halves = o64.view(tiles, 2, k, 2)
        for h in range(2):
            for m in range(2):
                halves[:, h, :, m] |= ((d64 >> (2 * h + m)) & _M1) << 2
    o64 += _NIBBLE * _offset(bits)
    return out.view(-1, k // 2)


def to_int4pack(qt: QuantizedTensor) -> Int4PackWeight:
    """Prepare an HQQ axis=1 weight for the int4pack kernel (there w = (nibble - 8) * s + z')."""
    n, k = qt.shape
    g, bits = int(qt.params["group_size"]), qt.bits
    packed = _nibbles(qt)
    scale, zero = (t.view(n, k // g) for t in hqq_scale_zero(qt))
    sz = torch.zeros(k // g, packed.shape[0], 2, dtype=torch.bfloat16)
    sz[:, :n, 0] = scale.t()
    sz[:, :n, 1] = ((2.0 ** (bits - 1) - zero) * scale).t()
    return Int4PackWeight(packed, sz, g, n)
