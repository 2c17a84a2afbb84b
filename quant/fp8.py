"""Block-scaled FP8 checkpoints (DeepSeek-V3 / MiMo style) -> dense weights at load."""
from __future__ import annotations

import torch


def dequantize_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128),
                          dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """w [N, K] float8 with `weight_scale_inv` [ceil(N/bn), ceil(K/bk)]: w.float() * scale per block."""
    n, k = weight.shape
    bn, bk = block
    want = (-(-n // bn), -(-k // bk))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"weight_scale_inv shape {tuple(scale_inv.shape)} does not match weight {(n, k)} "
                         f"with blocks {block}: expected {want}; check the checkpoint's weight_block_size")
    s = scale_inv.float().repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    return (weight.float() * s).to(dtype)
