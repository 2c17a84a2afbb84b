"""x @ W.T (+ bias) for dense bf16 / fp32 weights on the CPU at decode sizes, by our GEMV (q_gemv.c dense_gemv).

torch's bf16 matrix-vector product reads 7-14 GB/s on the development machine's EPYC, far below what the
memory gives; ours reads each weight row once for up to 8 rows of x, widening bf16 to fp32 exactly, and
accumulates in fp32 like F.linear, so outputs agree with it to fp32 rounding (then rounded to x's dtype).
Anything else (more rows, other dtypes or devices, strided weights, no native build) is F.linear.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from offload.kernels import native

MAX_ROWS = 8  # rows of x one pass over the weight serves; beyond, torch's GEMM reuses the weight better
DTYPES = (torch.bfloat16, torch.float32)


def servable(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, widen: bool = False) -> bool:
    """Whether our GEMV computes F.linear(x, w, bias): same dtype (bf16 or fp32; with `widen`, x fp32 and w
    either), CPU, contiguous, few rows."""
    same = x.dtype == w.dtype or (widen and x.dtype == torch.float32)
    return (w.dtype in DTYPES and same and w.dim() == 2 and w.device.type == "cpu"
            and x.device.type == "cpu" and w.is_contiguous() and 0 < x.numel() <= MAX_ROWS * w.shape[1]
            and not x.requires_grad and not w.requires_grad
            and (bias is None or (bias.dtype == w.dtype and bias.device.type == "cpu" and bias.is_contiguous())))


def dense_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, w, bias), by our GEMV where `servable`."""
    gemv = native.gemv() if servable(x, w, bias) else None
    if gemv is None:
        return F.linear(x, w, bias)
    y = gemv.dense(x.reshape(-1, w.shape[1]).float().contiguous(), w, bias)
    return y.to(x.dtype).view(*x.shape[:-1], w.shape[0])


def linear_fp32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear(x.float(), w.float()) without widening w in memory first (a router's fp32 scores)."""
    x = x.float()
    gemv = native.gemv() if servable(x, w, None, widen=True) else None
    if gemv is None:
        return F.linear(x, w.float())
    return gemv.dense(x.reshape(-1, w.shape[1]).contiguous(), w).view(*x.shape[:-1], w.shape[0])
