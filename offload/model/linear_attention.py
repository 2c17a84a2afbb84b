"""Gated DeltaNet, Qwen3.5-MoE's linear attention, as transformers' torch path computes it:

    q, k, v = split(silu(causal depthwise conv(in_proj_qkv(x))))      the conv's last K-1 inputs are state
    beta = sigmoid(in_proj_b(x));  g = -exp(A_log) * softplus(in_proj_a(x) + dt_bias)   (log decay, <= 0)
    S_t = exp(g_t) S_{t-1} + k_t (beta_t (v_t - k_t S_{t-1} exp(g_t)))   per value head, S [Dk, Dv], fp32
    o_t = q_t S_t / sqrt(Dk)  (q, k L2-normalised; key heads shared by num_v_heads / num_k_heads value heads)
    out = out_proj(rms_norm(o) * weight * silu(in_proj_z(x)))

A prefill uses the chunked form (chunks of CHUNK tokens: within a chunk the rule is a triangular solve, across
chunks the state carries over); a decode step, and each token of a speculative verify step (which must keep
every intermediate state for a roll-back), the recurrent form. The state never grows with the sequence.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..spec import LinearAttentionSpec
from .kv_cache import LinearState
from .linear import linear

CHUNK = 64  # transformers' chunk size: the same blocks, so the same rounding


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + 1e-6)


def chunked_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                       state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [B, H, T, Dk] (normed, q scaled), v [B, H, T, Dv], g, beta [B, H, T], state [B, H, Dk, Dv], all
    fp32 -> (out [B, H, T, Dv], state after the last token)."""
    B, H, T, _ = k.shape
    pad = -T % CHUNK
    q, k, v = (F.pad(x.contiguous(), (0, 0, 0, pad)).view(B, H, -1, CHUNK, x.shape[-1]) for x in (q, k, v))
    beta, g = (F.pad(x, (0, pad)).view(B, H, -1, CHUNK) for x in (beta, g))
    k_beta, v_beta = k * beta[..., None], v * beta[..., None]
    upper = torch.ones(CHUNK, CHUNK, dtype=torch.bool, device=q.device).triu(1)
    decay = g.cumsum(-1)  # log decay from each chunk's start
    pairwise = (decay[..., :, None] - decay[..., None, :]).masked_fill(upper, float("-inf")).exp()
    system = (k_beta @ k.transpose(-1, -2)) * pairwise  # unit lower triangular once the diagonal is added
    intra = (q @ k.transpose(-1, -2)) * pairwise
    values = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)
    k_decay = torch.linalg.solve_triangular(system, k_beta * decay.exp()[..., None], upper=False, unitriangular=True)
    q = q * decay.exp()[..., None]
    k = k * (decay[..., -1:] - decay).exp()[..., None]
    chunk_decay = decay[..., -1].exp()[..., None, None]
    out = values.new_empty(values.shape)
    for i in range(values.shape[2]):
        v_new = values[:, :, i] - k_decay[:, :, i] @ state
        out[:, :, i] = q[:, :, i] @ state + intra[:, :, i] @ v_new
        state = state * chunk_decay[:, :, i] + k[:, :, i].transpose(-1, -2) @ v_new
    return out.view(B, H, -1, out.shape[-1])[:, :, :T], state


def recurrent_delta_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
                         state: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """As chunked_delta_rule, token by token -> (out, the state after each token)."""
    outs, states = [], []
    for t in range(k.shape[2]):
        k_t = k[:, :, t, None]  # [B, H, 1, Dk]
        state = state * g[:, :, t, None, None].exp()
        delta = (v[:, :, t, None] - k_t @ state) * beta[:, :, t, None, None]
        state = state + k_t.transpose(-1, -2) @ delta
        outs.append(q[:, :, t, None] @ state)
        states.append(state)
    return torch.cat(outs, 2), states


def prepare(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A layer's weights as gated_deltanet reads them: the four input projections as one matrix ("in", one
    matrix-vector product per decode step instead of four: the same dot products) when they
    are dense tensors of one dtype and device, and the decay's constants in fp32, computed once."""
    w = dict(w)
    parts = [w[n] for n in INPUTS]
    if all(isinstance(t, torch.Tensor) for t in parts) and len({(t.dtype, t.device) for t in parts}) == 1:
        w["in"] = torch.cat(parts)
        for n in INPUTS:
            del w[n]
    w["neg_A"] = -w.pop("A_log").float().exp()
    w["dt_bias"] = w["dt_bias"].float()
    return w


INPUTS = ("qkv", "z", "b", "a")


def _inputs(x: torch.Tensor, w: dict[str, torch.Tensor], s: LinearAttentionSpec) -> list[torch.Tensor]:
    if "in" not in w:  # quantized projections: one kernel call each
        return [linear(x, w[n]) for n in INPUTS]
    return list(linear(x, w["in"]).split([s.conv_channels, s.num_v_heads * s.v_head_dim, s.num_v_heads,
                                          s.num_v_heads], -1))


def gated_deltanet(x: torch.Tensor, w: dict[str, torch.Tensor], s: LinearAttentionSpec, eps: float,
                   valid: torch.Tensor, cache: LinearState) -> torch.Tensor:
    """x [B, T, H] -> [B, T, H], reading and advancing `cache`; `w` as `prepare` leaves it. Padding (not `valid`)
    is zeroed first, as in transformers: a zero input leaves the conv inputs zero and the state unchanged
    (k = 0), so a left-padded row computes what the prompt alone does."""
    B, T, _ = x.shape
    x = x * valid[..., None].to(x.dtype)
    qkv, z, b, a = _inputs(x, w, s)
    window = torch.cat((cache.conv, qkv.transpose(1, 2)), -1)  # [B, C, K-1+T]
    mixed = F.silu(F.conv1d(window, w["conv"][:, None], groups=window.shape[1])).transpose(1, 2)
    nk, nv = s.num_k_heads * s.k_head_dim, s.num_v_heads * s.v_head_dim
    q, k, v = (t.reshape(B, T, -1, d).transpose(1, 2).float()
               for t, d in zip(mixed.split([nk, nk, nv], -1), (s.k_head_dim, s.k_head_dim, s.v_head_dim)))
    if s.num_v_heads != s.num_k_heads:
        q, k = (t.repeat_interleave(s.num_v_heads // s.num_k_heads, dim=1) for t in (q, k))
    q, k = _l2norm(q) * s.k_head_dim ** -0.5, _l2norm(k)
    beta = b.sigmoid().float().transpose(1, 2)
    g = (w["neg_A"] * F.softplus(a.float() + w["dt_bias"])).transpose(1, 2)
    if T == 1 or cache.records(T):
        out, states = recurrent_delta_rule(q, k, v, g, beta, cache.state)
    else:
        out, state = chunked_delta_rule(q, k, v, g, beta, cache.state)
        states = [state]
    cache.update(window, states)
    out = out.transpose(1, 2).to(x.dtype)  # [B, T, Hv, Dv]
    normed = w["norm"] * F.rms_norm(out.float(), out.shape[-1:], None, eps).to(x.dtype)
    out = (normed * F.silu(z.reshape(B, T, s.num_v_heads, s.v_head_dim).float())).to(x.dtype)
    return linear(out.reshape(B, T, -1), w["o"])
