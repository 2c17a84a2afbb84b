"""Grouped-query attention with optional sliding window, learned sinks, q/k norms, partial rope and value
scaling: every variant the supported architectures use, selected by the layer's AttentionSpec.

A decode step is kept to few torch ops: one projection for q, k and v (`fuse_qkv`), q/k norms and rope applied
to q and k together, grouped queries attending to their shared keys without copying them, and masks computed
once per forward pass (`Step`) instead of once per layer. Every op is the one transformers' eager attention
rounds at, so logits match it. On a CPU with our native kernels, passes of up to NATIVE_MAX_TOKENS new
tokens attend in one call (decode_attention in q_gemv.c: fp32 throughout, where the torch ops round scores
and probabilities to the model's dtype), instead of ~20 torch ops a layer."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from offload.kernels import native
from offload.kernels.cpu import stacked_rows

from ..spec import AttentionSpec, RopeSpec
from .kv_cache import KeysView, LayerCache
from .linear import linear
from .mla import mla_attention
from .norm import rms_norm
from .rope import apply_rotary

NATIVE_MAX_TOKENS = 8  # new tokens a pass attends with the native kernel (decode and verify steps), per row


@dataclass
class Step:
    """Where a forward pass's T new tokens go, shared by all its layers. start: the first one's sequence index
    (a Python int: the cache writes without a host sync); index [T] the same as a tensor; valid [B, T]: not
    padding; rotary: (cos, signed sin) per RopeSpec. masks: per (window, keys), filled by the first layer that
    needs one: every layer of a window size holds the same positions, so their masks are equal."""
    start: int
    index: torch.Tensor
    valid: torch.Tensor
    rotary: dict[RopeSpec, tuple[torch.Tensor, torch.Tensor]]
    masks: dict[tuple[int | None, int], torch.Tensor] = field(default_factory=dict)

    def blocked(self, keys: KeysView, window: int | None) -> torch.Tensor:
        """[B, 1, T, S] True where query t may not attend key s."""
        key = (window, keys.index.shape[0])
        if key not in self.masks:
            k_idx = keys.index[None, :]
            q_idx = self.index[:, None]
            allowed = (k_idx >= 0) & (k_idx <= q_idx)
            if window is not None:
                allowed &= k_idx > q_idx - window
            self.masks[key] = ~(allowed[None] & keys.valid[:, None, :])[:, None]
        return self.masks[key]


def fuse_qkv(w: dict, a: AttentionSpec) -> dict:
    """One attention layer's weights with q, k and v concatenated into "qkv" (one matrix-vector product
    instead of three; each output row is the same dot product, so results are unchanged) when they are dense
    tensors of one dtype and device, or tiles of our CPU GEMV (kernels.cpu.stacked_rows); joint q/k norm
    weights ("qk_norm") when q and k are normed alike."""
    w = dict(w)
    parts = [w.get(n) for n in ("q", "k", "v")]
    if all(isinstance(t, torch.Tensor) for t in parts) and len({(t.dtype, t.device) for t in parts}) == 1:
        fused = torch.cat(parts)
    else:  # quantized for our CPU GEMV: their tiles one after the other
        fused = stacked_rows(parts)
    if fused is not None:
        w["qkv"] = fused
        del w["q"], w["k"], w["v"]
        if all(f"{n}_bias" in w for n in ("q", "k", "v")):
            w["qkv_bias"] = torch.cat([w.pop(f"{n}_bias") for n in ("q", "k", "v")])
    if "qk_norm" in w:  # fused already
        return w
    if a.qk_norm == "head":
        w["qk_norm"] = torch.cat((w["q_norm"].expand(a.num_heads, -1), w["k_norm"].expand(a.num_kv_heads, -1)))
    elif a.qk_norm == "full" and a.num_heads == a.num_kv_heads:
        w["qk_norm"] = torch.stack((w["q_norm"], w["k_norm"]))
    if "qk_norm" in w:
        del w["q_norm"], w["k_norm"]
    return w


def _project(x: torch.Tensor, w: dict, a: AttentionSpec,
             eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x [B, T, H] -> (q and k normed, as [B, T, Hq + Hkv, D]; v [B, T, Hkv * Dv]; the output gate's
    pre-activation [B, T, Hq * D], or None). With an output gate, q's projection gives per head D query
    channels then D gate channels, as in transformers."""
    B, T, _ = x.shape
    nq, nk, nv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim, a.num_kv_heads * a.v_head_dim
    gate = None
    if a.output_gate:
        if "qkv" in w:
            q, k, v = linear(x, w["qkv"]).split([2 * nq, nk, nv], -1)
        else:
            q, k, v = (linear(x, w[n]) for n in ("q", "k", "v"))
        q, gate = q.view(B, T, a.num_heads, 2, a.head_dim).unbind(3)
        qk, gate = torch.cat((q.reshape(B, T, nq), k), -1), gate.reshape(B, T, nq)
    elif "qkv" in w:
        qkv = linear(x, w["qkv"], w.get("qkv_bias"))
        qk, v = qkv[..., :nq + nk], qkv[..., nq + nk:]
    else:  # quantized projections: one kernel call each
        q, k, v = (linear(x, w[n], w.get(f"{n}_bias")) for n in ("q", "k", "v"))
        qk = torch.cat((q, k), -1)
    if a.qk_norm == "full":
        if "qk_norm" in w:  # q and k the same size: one norm over [B, T, 2, Hq * D]
            qk = rms_norm(qk.reshape(B, T, 2, nq), w["qk_norm"], eps)
        else:
            qk = torch.cat((rms_norm(qk[..., :nq], w["q_norm"], eps), rms_norm(qk[..., nq:], w["k_norm"], eps)), -1)
    if a.clip_qkv is not None:  # after a full q/k norm, before a per-head one, as transformers does
        qk, v = qk.clamp(-a.clip_qkv, a.clip_qkv), v.clamp(-a.clip_qkv, a.clip_qkv)
    qk = qk.reshape(B, T, a.num_heads + a.num_kv_heads, a.head_dim)
    if a.qk_norm == "head":
        qk = rms_norm(qk, w["qk_norm"], eps)
    return qk, v, gate


def attention(x: torch.Tensor, w: dict[str, torch.Tensor], a: AttentionSpec, eps: float, step: Step,
              cache: LayerCache) -> torch.Tensor:
    """x [B, T, H] -> [B, T, H]; `w` as `fuse_qkv` leaves it (or plain q, k, v)."""
    if a.mla is not None:
        return mla_attention(x, w, a, step, cache)
    B, T, _ = x.shape
    qk, v, gate = _project(x, w, a, eps)
    cos, sin = step.rotary[a.rope]
    qk = apply_rotary(qk.transpose(1, 2), cos, sin)  # [B, Hq + Hkv, T, D]
    q, k = qk[:, :a.num_heads], qk[:, a.num_heads:]
    v = v.view(B, T, a.num_kv_heads, a.v_head_dim).transpose(1, 2)
    if a.value_scale != 1.0:
        v = v * a.value_scale

    keys = cache.update(k, v, step.start, step.index, step.valid)
    gemv = native.gemv() if x.device.type == "cpu" and T <= NATIVE_MAX_TOKENS else None
    if gemv is not None and keys.k.dtype in (torch.bfloat16, torch.float32) and keys.k.stride(-1) == 1:
        blocked = step.blocked(keys, a.window)
        sinks = w["sinks"].float() if a.sinks else None
        out = gemv.attention(q.float().contiguous(), keys.k, keys.v, blocked.contiguous().view(torch.uint8), sinks,
                             a.head_dim ** -0.5).to(x.dtype).view(B, T, -1)
    else:
        out = _attend(q, keys, a, w, step)
    if gate is not None:
        out = out * torch.sigmoid(gate)
    return linear(out, w["o"], w.get("o_bias"))


def _attend(q: torch.Tensor, keys: KeysView, a: AttentionSpec, w: dict, step: Step) -> torch.Tensor:
    """q [B, Hq, T, D] against the cache's keys in torch ops -> [B, T, Hq * Dv]."""
    B, _, T, _ = q.shape
    groups = a.num_heads // a.num_kv_heads
    # the queries of a group share one key head: [B, Hkv, groups * T, D] against [B, Hkv, S, D], no copies of keys
    q = q.reshape(B, a.num_kv_heads, groups * T, a.head_dim)
    scores = torch.matmul(q, keys.k.transpose(2, 3)).view(B, a.num_heads, T, -1) * a.head_dim ** -0.5
    scores = scores.masked_fill(step.blocked(keys, a.window), torch.finfo(scores.dtype).min)
    if a.sinks:  # transformers subtracts the max over keys and sink before the softmax; then drops the sink
        sink = w["sinks"].to(scores.dtype).view(1, -1, 1, 1).expand(B, -1, T, 1)
        scores = torch.cat((scores, sink), dim=-1)
        scores = scores - scores.amax(dim=-1, keepdim=True)
        probs = torch.softmax(scores, dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)  # computed in fp32, rounded once: as transformers' fp32 softmax
    probs = probs.to(keys.v.dtype).view(B, a.num_kv_heads, groups * T, -1)
    return torch.matmul(probs, keys.v).view(B, a.num_heads, T, -1).transpose(1, 2).reshape(B, T, -1)
