"""x @ W.T (+ bias) for a dense weight or a quantized one (offload.kernels picks the kernel)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from offload.kernels import qmatmul


def linear(x: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, bias)
    return qmatmul(x, w, bias)
