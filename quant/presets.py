"""Named quantization presets: which format each weight role gets.

Router, norms, embeddings and lm_head are never quantized (tiny, or too sensitive).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from offload.quant.hqq import quantize_hqq
from offload.quant.layout import padded_rows
from offload.quant.nf4 import quantize_nf4
from offload.quant.tensor import QuantizedTensor

ROLES = ("attention", "expert", "shared_expert", "dense_mlp")
NEVER_QUANTIZED = ("router", "norm", "embedding", "lm_head")


@dataclass(frozen=True)
class QuantSpec:
    """How one weight role is stored: fmt "hqq" | "nf4" | "none"."""

    fmt: str
    bits: int = 16
    group_size: int = 0
    axis: int = 1
    meta_bits: int = 8
    meta_group: int = 128

    def quantize(self, weight: torch.Tensor, name: str = "weight") -> QuantizedTensor | torch.Tensor:
        if self.fmt == "hqq":
            return quantize_hqq(weight, self.bits, self.group_size, self.axis, meta_bits=self.meta_bits,
                                meta_group=self.meta_group, name=name)
        if self.fmt == "nf4":
            return quantize_nf4(weight, self.group_size, name=name)
        return weight

    def nbytes(self, shape: tuple[int, int]) -> int:
        """Exact stored bytes for a weight of `shape` (no quantization needed)."""
        n, k = shape
        if self.fmt == "hqq":
            groups = n * k // self.group_size
            padded = -(-groups // self.meta_group) * self.meta_group
            meta = 2 * (padded + padded // self.meta_group * 8) if self.meta_bits else 4 * groups
            return padded_rows(n) * k * self.bits // 8 + meta
        if self.fmt == "nf4":
            blocks = n * k // self.group_size
            return n * k // 2 + blocks + 4 * -(-blocks // 256) + 4
        return n * k * 2

    def bits_per_param(self, shape: tuple[int, int] = (4096, 14336)) -> float:
        return 8.0 * self.nbytes(shape) / (shape[0] * shape[1])


NONE = QuantSpec("none")
HQQ4 = QuantSpec("hqq", 4, 64)
NF4 = QuantSpec("nf4", 4, 64)


@dataclass(frozen=True)
class Preset:
    name: str
    attention: QuantSpec
    expert: QuantSpec
    shared_expert: QuantSpec
    dense_mlp: QuantSpec

    def spec(self, role: str) -> QuantSpec:
        if role in NEVER_QUANTIZED:
            return NONE
        if role not in ROLES:
            raise ValueError(f"unknown weight role {role!r}; use one of {list(ROLES + NEVER_QUANTIZED)}")
        return getattr(self, role)


def _attn4(name: str, expert: QuantSpec) -> Preset:
    return Preset(name, HQQ4, expert, HQQ4, HQQ4)


PRESETS: dict[str, Preset] = {
    "a4e2": _attn4("a4e2", QuantSpec("hqq", 2, 32)),
    "a4e3": _attn4("a4e3", QuantSpec("hqq", 3, 64)),
    "a4e4": _attn4("a4e4", HQQ4),
    "nf4": Preset("nf4", NF4, NF4, NF4, NF4),
    "none": Preset("none", NONE, NONE, NONE, NONE),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown quantization preset {name!r}; use one of {sorted(PRESETS)}")
    return PRESETS[name]
