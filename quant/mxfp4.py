"""MXFP4 (OCP microscaling, as shipped by gpt-oss), kept as is: no re-quantization.

blocks uint8 [rows, cols/32, 16]: two FP4 e2m1 codes per byte, low nibble = even column;
scales uint8 [rows, cols/32]: E8M0, factor 2**(s - 127).
"""
from __future__ import annotations

import torch
from offload.quant.tensor import QuantizedTensor, register_format

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def from_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, *, name: str = "weight") -> QuantizedTensor:
    """Wrap one matrix's MXFP4 blocks/scales (e.g. one gpt-oss expert) without copying."""
    if blocks.dtype != torch.uint8 or blocks.dim() != 3 or blocks.shape[-1] != 16:
        raise ValueError(f"{name}: MXFP4 blocks must be uint8 [rows, cols/32, 16], got {blocks.dtype} "
                         f"{tuple(blocks.shape)}; slice one expert out of the [E, ...] tensor first")
    if tuple(scales.shape) != tuple(blocks.shape[:2]):
        raise ValueError(f"{name}: MXFP4 scales shape {tuple(scales.shape)} must equal blocks.shape[:2] "
                         f"{tuple(blocks.shape[:2])}; pass the matching *_scales tensor")
    rows, groups, _ = blocks.shape
    return QuantizedTensor("mxfp4", (rows, groups * 32), {"bits": 4, "group_size": 32},
                           {"blocks": blocks, "scales": scales.to(torch.uint8)})


def _byte_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[256, 2]: the (even, odd) element values of every byte."""
    lut = torch.tensor(FP4_VALUES, dtype=dtype, device=device)
    b = torch.arange(256, device=device)
    return torch.stack([lut[b & 0xF], lut[b >> 4]], 1)


@register_format("mxfp4")
def dequantize_mxfp4(qt: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    blocks, scales = qt.tensors["blocks"], qt.tensors["scales"]
    vals = _byte_table(dtype, blocks.device)[blocks.long()].view(*scales.shape, 32)
    out = torch.ldexp(vals, (scales.to(torch.int32) - 127).unsqueeze(-1).to(dtype))
    return out.reshape(qt.shape)
