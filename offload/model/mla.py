"""DeepSeek's Multi-head Latent Attention (MLA). The cache holds, per position, the normed latent
(kv_lora_rank channels) and the one rotary key shared by all heads, not expanded keys and values: for
DeepSeek-V3 576 values a position and layer instead of 128 heads x (192 + 128).

Two ways to attend over that cache, the same attention up to rounding:
- expanded (long prefills): kv_b_proj turns every cached latent into per-head keys and values, as transformers does;
- absorbed (decode, short chunks): kv_b_proj's key half is folded into each query and its value half applied
  after the weighted sum, so queries score the latents directly (DeepSeek-V3's reference "absorb" mode); the
  cost no longer grows with heads x head size per cached position.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..spec import AttentionSpec
from .kv_cache import KeysView, LayerCache
from .linear import linear
from .norm import rms_norm
from .rope import apply_rotary

if TYPE_CHECKING:
    from .attention import Step

LATENT_EPS = 1e-6  # q_a_layernorm's and kv_a_layernorm's: RMSNorm's default, not config.rms_norm_eps (transformers)


def absorbs(a: AttentionSpec, tokens: int) -> bool:
    """Whether absorbing costs fewer multiply-adds per head and cached position than expanding: expanding
    projects the position's latent to a key and a value, then scores and sums; absorbing scores and sums the
    `tokens` queries in latent space."""
    m = a.mla
    expanded = m.kv_lora_rank * (m.nope_dim + a.v_head_dim) + tokens * (a.head_dim + a.v_head_dim)
    return tokens * (2 * m.kv_lora_rank + a.rope.head_dim) < expanded


def _deinterleave(x: torch.Tensor) -> torch.Tensor:
    """Rotary pairs (x0, x1), (x2, x3)... -> the rotate-half layout [x0, x2, ..., x1, x3, ...]: the rotation is then
    `apply_rotary`'s, the same products as transformers' interleaved rope; q and k are permuted alike, so every
    score is the same sum."""
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)


def _queries(x: torch.Tensor, w: dict, a: AttentionSpec) -> torch.Tensor:
    """x [B, T, H] -> q [B, heads, T, nope + rope]."""
    B, T, _ = x.shape
    if a.mla.q_lora_rank is None:
        q = linear(x, w["q"])
    else:
        q = linear(rms_norm(linear(x, w["q_a"], w.get("q_a_bias")), w["q_a_norm"], LATENT_EPS), w["q_b"])
    return q.view(B, T, a.num_heads, a.head_dim).transpose(1, 2)


def mla_attention(x: torch.Tensor, w: dict, a: AttentionSpec, step: Step, cache: LayerCache) -> torch.Tensor:
    """x [B, T, H] -> [B, T, H]; `w`: the layer's `attn.*` weights."""
    B, T, _ = x.shape
    m, rope = a.mla, a.rope.head_dim
    q_nope, q_rope = _queries(x, w, a).split([m.nope_dim, rope], dim=-1)
    latent, k_rope = linear(x, w["kv_a"], w.get("kv_a_bias")).split([m.kv_lora_rank, rope], dim=-1)
    latent = rms_norm(latent, w["kv_a_norm"], LATENT_EPS)[:, None]  # [B, 1, T, kv_lora_rank]
    k_rope = k_rope[:, None]
    if m.interleaved:
        q_rope, k_rope = _deinterleave(q_rope), _deinterleave(k_rope)
    cos, sin = step.rotary[a.rope]
    q_rope, k_rope = apply_rotary(q_rope, cos, sin), apply_rotary(k_rope, cos, sin)
    keys = cache.update(latent, k_rope, step.start, step.index, step.valid)  # k: latents, v: rotary keys
    kv_b = w["kv_b"].view(a.num_heads, m.nope_dim + a.v_head_dim, m.kv_lora_rank)
    blocked = step.blocked(keys, None)
    if absorbs(a, T):
        q_latent = torch.matmul(q_nope, kv_b[:, :m.nope_dim])  # [B, heads, T, kv_lora_rank]
        scores = torch.matmul(q_latent, keys.k.transpose(2, 3)) + torch.matmul(q_rope, keys.v.transpose(2, 3))
        probs = _softmax(scores * m.softmax_scale, blocked).to(keys.k.dtype)
        out = torch.matmul(torch.matmul(probs, keys.k), kv_b[:, m.nope_dim:].transpose(1, 2))
    else:
        k_nope, v = _expand(keys, kv_b, m.nope_dim)
        k = torch.cat((k_nope, keys.v.expand(-1, a.num_heads, -1, -1)), dim=-1)
        scores = torch.matmul(torch.cat((q_nope, q_rope), dim=-1), k.transpose(2, 3)) * m.softmax_scale
        out = torch.matmul(_softmax(scores, blocked).to(v.dtype), v)
    return linear(out.transpose(1, 2).reshape(B, T, -1), w["o"], w.get("o_bias"))


def _expand(keys: KeysView, kv_b: torch.Tensor, nope: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached latents [B, 1, S, C] -> per-head keys without position [B, heads, S, nope] and values."""
    kv = torch.matmul(keys.k, kv_b.transpose(1, 2))  # [B, heads, S, nope + v]
    return kv[..., :nope], kv[..., nope:]


def _softmax(scores: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
    return torch.softmax(scores.masked_fill(blocked, torch.finfo(scores.dtype).min), dim=-1)
