"""Input checks shared by the quantizers: fail early with the tensor's name and the fix."""
from __future__ import annotations

import torch


def check_weight(weight: torch.Tensor, name: str) -> None:
    """A quantizable weight is a finite floating-point matrix."""
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point torch.Tensor, got {type(weight).__name__}"
                         f"{'' if not isinstance(weight, torch.Tensor) else ' of ' + str(weight.dtype)}; "
                         "pass the dense weight before quantizing")
    if weight.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D weight [out, in], got shape {tuple(weight.shape)}; "
                         "quantize each expert's matrix separately")
    finite = torch.isfinite(weight)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(f"{name}: contains {bad} NaN/Inf values; fix or re-export the checkpoint "
                         "(quantizing non-finite weights would corrupt whole groups)")


def check_choice(value: int, allowed: tuple[int, ...], what: str, name: str) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: unsupported {what} {value}; use one of {list(allowed)}")


def check_divisible(size: int, group: int, dim: str, name: str, shape: tuple[int, ...]) -> None:
    if size % group:
        raise ValueError(f"{name}: {dim} size {size} of shape {tuple(shape)} is not divisible by the "
                         f"group size {group}; pick a group size that divides it")
