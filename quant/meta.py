"""Second-level quantization of HQQ scales/zeros (as in arXiv 2312.17238).

hqq 0.2.x keeps one 16-bit scale and zero per group: at 2-bit, group 32 that alone costs
1 bit/param. Storing them as 8-bit codes with an fp32 (step, min) per `group` of them
brings the metadata to ~0.5 bit/param.
"""
from __future__ import annotations

import torch


def quantize_meta(values: torch.Tensor, bits: int = 8, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """values (any shape, float) -> (codes uint8 [G padded to group], affine fp32 [G/group, 2])."""
    v = values.float().reshape(-1)
    pad = (-v.numel()) % group
    if pad:
        v = torch.cat([v, v[-1:].expand(pad)])
    v = v.view(-1, group)
    lo, hi = v.amin(1, keepdim=True), v.amax(1, keepdim=True)
    step = ((hi - lo) / (2**bits - 1)).clamp_min(1e-12)
    codes = ((v - lo) / step).round_().clamp_(0, 2**bits - 1).to(torch.uint8)
    return codes.view(-1), torch.cat([step, lo], 1)


def dequantize_meta(codes: torch.Tensor, affine: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of quantize_meta: fp32 [count] (padding dropped)."""
    v = codes.view(affine.shape[0], -1).float() * affine[:, :1] + affine[:, 1:]
    return v.view(-1)[:count]
