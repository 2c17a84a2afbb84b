"""Rotary position embeddings: default and YaRN inverse frequencies, partial rotary, cos/sin tables.

Follows transformers' `modeling_rope_utils` formulas exactly (tests compare logits against it).
"""
from __future__ import annotations

import math

import torch

from ..spec import RopeSpec


def inverse_frequencies(rope: RopeSpec) -> tuple[torch.Tensor, float]:
    """(inv_freq [rotary_dim/2], attention scaling applied to cos and sin)."""
    dim = int(rope.head_dim * rope.partial_factor)
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
    if rope.kind == "default":
        return 1.0 / pos_freqs, 1.0
    return _yarn(rope, dim, pos_freqs)


def _yarn(rope: RopeSpec, dim: int, pos_freqs: torch.Tensor) -> tuple[torch.Tensor, float]:
    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    factor = rope.factor
    attention = rope.attention_factor
    if attention is None:
        attention = (mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim)
                     if rope.mscale and rope.mscale_all_dim else mscale(factor))

    def correction_dim(rotations: float) -> float:
        return dim * math.log(rope.original_max_positions / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention)


class RotaryTable:
    """cos/sin for given positions; one instance per distinct RopeSpec, shared by the layers using it."""

    def __init__(self, rope: RopeSpec, device: torch.device | str) -> None:
        inv_freq, self.scaling = inverse_frequencies(rope)
        self.inv_freq = inv_freq.to(device)
        self.rotary_dim = 2 * inv_freq.numel()

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, signed sin [B, 1, T, rotary_dim] (broadcast over heads); the sin's first half
        negated, for `apply_rotary`."""
        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        sin = (emb.sin() * self.scaling).to(dtype)
        sin[..., : freqs.shape[-1]].neg_()
        return (emb.cos() * self.scaling).to(dtype), sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rotary_dim channels of x [B, heads, T, D] (rotate-half convention); pass the rest.
    transformers' rotate_half(x) * sin is [-x2 * s, x1 * s]: here x rolled by half, [x2, x1], times the signed
    sin [-s, s], the same products bit for bit in two ops instead of four."""
    d = cos.shape[-1]
    if d == x.shape[-1]:
        return x * cos + x.roll(d // 2, -1) * sin
    rot = x[..., :d]
    return torch.cat((rot * cos + rot.roll(d // 2, -1) * sin, x[..., d:]), dim=-1)
