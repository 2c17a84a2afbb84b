"""Grouped-query attention with optional sliding window, learned sinks, q/k norms, partial rope and value
scaling: every variant the supported architectures use, selected by the layer's AttentionSpec."""
from __future__ import annotations

import torch

from ..spec import AttentionSpec
from .kv_cache import KeysView, LayerCache
from .linear import linear
from .norm import rms_norm
from .rope import apply_rotary


def _mask(keys: KeysView, q_index: torch.Tensor, window: int | None) -> torch.Tensor:
    """[B, 1, T, S] True where query t may attend key s."""
    k_idx = keys.index[None, :]
    q_idx = q_index[:, None]
    allowed = (k_idx >= 0) & (k_idx <= q_idx)
    if window is not None:
        allowed &= k_idx > q_idx - window
    return (allowed[None] & keys.valid[:, None, :])[:, None]


def attention(x: torch.Tensor, w: dict[str, torch.Tensor], a: AttentionSpec, eps: float,
              cos_sin: tuple[torch.Tensor, torch.Tensor], cache: LayerCache, q_index: torch.Tensor,
              valid: torch.Tensor) -> torch.Tensor:
    """x [B, T, H] -> [B, T, H]. `q_index` [T]: sequence indices of the new tokens; `valid` [B, T]: not padding."""
    B, T, _ = x.shape
    q = linear(x, w["q"], w.get("q_bias"))
    k = linear(x, w["k"], w.get("k_bias"))
    v = linear(x, w["v"], w.get("v_bias"))
    if a.qk_norm == "full":
        q, k = rms_norm(q, w["q_norm"], eps), rms_norm(k, w["k_norm"], eps)
    if a.clip_qkv is not None:
        q, k, v = (t.clamp(-a.clip_qkv, a.clip_qkv) for t in (q, k, v))
    q = q.view(B, T, a.num_heads, a.head_dim)
    k = k.view(B, T, a.num_kv_heads, a.head_dim)
    if a.qk_norm == "head":
        q, k = rms_norm(q, w["q_norm"], eps), rms_norm(k, w["k_norm"], eps)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    v = v.view(B, T, a.num_kv_heads, a.v_head_dim).transpose(1, 2)
    if a.value_scale != 1.0:
        v = v * a.value_scale
    cos, sin = cos_sin
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    keys = cache.update(k, v, q_index, valid)
    groups = a.num_heads // a.num_kv_heads
    kk = keys.k.repeat_interleave(groups, dim=1) if groups > 1 else keys.k
    vv = keys.v.repeat_interleave(groups, dim=1) if groups > 1 else keys.v
    scores = torch.matmul(q, kk.transpose(2, 3)) * a.head_dim ** -0.5
    scores = scores.masked_fill(~_mask(keys, q_index, a.window), torch.finfo(scores.dtype).min)
    if a.sinks:
        sink = w["sinks"].to(scores.dtype).view(1, -1, 1, 1).expand(B, -1, T, 1)
        scores = torch.cat((scores, sink), dim=-1)
    scores = scores - scores.amax(dim=-1, keepdim=True)
    probs = torch.softmax(scores, dim=-1)
    if a.sinks:
        probs = probs[..., :-1]
    out = torch.matmul(probs.to(vv.dtype), vv).transpose(1, 2).reshape(B, T, -1)
    return linear(out, w["o"], w.get("o_bias"))
