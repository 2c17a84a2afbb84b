"""QuantizedTensor: one quantized matrix = a format name, a few plain tensors, a few ints.

Keeping the state as plain tensors plus JSON-able parameters is what lets an expert be
packed into one blob (offload.quant.pack) and viewed back without copies on any device.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

Decoder = Callable[["QuantizedTensor", torch.dtype], torch.Tensor]
_DECODERS: dict[str, Decoder] = {}


def register_format(fmt: str) -> Callable[[Decoder], Decoder]:
    """Register the dequantizer of a format (each format module registers itself)."""

    def deco(fn: Decoder) -> Decoder:
        _DECODERS[fmt] = fn
        return fn

    return deco


@dataclass
class QuantizedTensor:
    """A quantized 2-D weight W [out, in].

    fmt: "hqq" | "nf4" | "mxfp4"; params: format parameters (ints/strings only);
    tensors: the stored state (uint8 codes, metadata), all on one device.
    derived: not stored state: forms computed from `tensors` by others (offload.kernels keeps a prepared
    form here, with what it needs to tell whether it still matches the tensors).
    """

    fmt: str
    shape: tuple[int, int]
    params: dict[str, int | str]
    tensors: dict[str, torch.Tensor] = field(repr=False)
    derived: dict = field(default_factory=dict, repr=False, compare=False)

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The dense weight [out, in] in `dtype`, on the tensors' device."""
        return _DECODERS[self.fmt](self, dtype)

    @property
    def bits(self) -> int:
        return int(self.params.get("bits", 4))

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes of all stored tensors (codes + metadata): what a copy moves."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.nbytes / self.numel

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "QuantizedTensor":
        moved = {k: v.to(device, non_blocking=non_blocking) for k, v in self.tensors.items()}
        return QuantizedTensor(self.fmt, self.shape, dict(self.params), moved)
