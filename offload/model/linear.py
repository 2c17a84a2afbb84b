"""x @ W.T (+ bias) for a dense weight or a quantized one (offload.kernels picks the kernel)."""
from __future__ import annotations

import torch

from offload.kernels import qmatmul
from offload.kernels.dense import dense_linear


def linear(x: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(w, torch.Tensor):
        return dense_linear(x, w, bias)
    return qmatmul(x, w, bias)
