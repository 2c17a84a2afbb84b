"""Tiled bit layouts for 2/3/4-bit codes, shared by the CPU and Triton kernels.

Our own layout: the bytes packed checkpoints store, read as they are by our CPU GEMV (AVX2 and
AVX-512 builds) and the Triton kernels; torch's int4pack layout is another matter (it differs
between AVX2 and AVX-512 CPUs), reached only by conversion (offload.kernels.cpu.int4pack_weight).
Rows are padded to tiles of 64. Within a tile, a byte holds codes of the same column k for rows
16 or 32 apart, so that a 16-byte column becomes 16-row float vectors (or 8-row halves) with one
mask each, for every bit width (a 4-bit 32-row block: byte j = row j | row j+16 << 4):
  4-bit  [T, 2, K, 16]  byte (h, k, j): row 32h+j (bits 0-3), row 32h+16+j (bits 4-7)
  2-bit  [T, K, 16]     byte (k, j): rows j, 32+j, 16+j, 48+j at bits 0, 2, 4, 6
  3-bit  2-bit plane of the low bits + 1-bit plane [T, K, 8] of the high bit:
         byte (k, j) bit ONE_BIT_SHIFT[a] = high bit of row 8a+j
See FORMAT.md.
"""
from __future__ import annotations

import torch

TILE_N = 64
# 2-bit: row 16a+j lives at bit 2*TWO_BIT_POS[a] of byte j.
TWO_BIT_POS = (0, 2, 1, 3)
# 1-bit plane: row 8a+j lives at bit ONE_BIT_SHIFT[a] of byte j.
ONE_BIT_SHIFT = (0, 1, 4, 5, 2, 3, 6, 7)


def padded_rows(n: int) -> int:
    return -(-n // TILE_N) * TILE_N


def _pad_rows(codes: torch.Tensor) -> torch.Tensor:
    n, k = codes.shape
    if n == padded_rows(n):
        return codes
    return torch.cat([codes, codes.new_zeros(padded_rows(n) - n, k)])


def _combine(parts: torch.Tensor, shifts: tuple[int, ...]) -> torch.Tensor:
    """OR together parts[..., a, :, :] << shifts[a] along dim -3."""
    out = torch.zeros_like(parts.select(-3, 0))
    for a, s in enumerate(shifts):
        out |= parts.select(-3, a) << s
    return out


def _split(packed: torch.Tensor, shifts: tuple[int, ...], mask: int) -> torch.Tensor:
    return torch.stack([(packed >> s) & mask for s in shifts], dim=-3)


def pack_codes(codes: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """codes uint8 [N, K] (values < 2**bits) -> {"qweight": ..., ["qhigh": ...]} uint8."""
    c = _pad_rows(codes.to(torch.uint8))
    t, k = c.shape[0] // TILE_N, c.shape[1]
    if bits == 4:  # [T, 2h, 2nib, 16j, K] -> [T, 2h, K, 16j]
        v = c.view(t, 2, 2, 16, k).transpose(-1, -2)
        return {"qweight": _combine(v, (0, 4)).contiguous()}
    low = c & 3
    v = low.view(t, 4, 16, k).transpose(-1, -2)  # [T, 4a, K, 16j]
    out = {"qweight": _combine(v, tuple(2 * p for p in TWO_BIT_POS)).contiguous()}
    if bits == 3:
        hi = (c >> 2).view(t, 8, 8, k).transpose(-1, -2)  # [T, 8a, K, 8j]
        out["qhigh"] = _combine(hi, ONE_BIT_SHIFT).contiguous()
    return out


def unpack_codes(tensors: dict[str, torch.Tensor], bits: int, k: int) -> torch.Tensor:
    """Inverse of pack_codes: uint8 codes [N_padded, K]."""
    q = tensors["qweight"]
    if bits == 4:
        v = _split(q.view(-1, 2, k, 16), (0, 4), 0xF)  # [T, 2h, 2nib, K, 16j]
        return v.transpose(-1, -2).reshape(-1, k)
    v = _split(q.view(-1, k, 16), tuple(2 * p for p in TWO_BIT_POS), 3)  # [T, 4a, K, 16j]
    codes = v.transpose(-1, -2).reshape(-1, k)
    if bits == 3:
        hi = _split(tensors["qhigh"].view(-1, k, 8), ONE_BIT_SHIFT, 1)  # [T, 8a, K, 8j]
        codes = codes | (hi.transpose(-1, -2).reshape(-1, k) << 2)
    return codes
