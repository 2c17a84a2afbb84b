"""Router and expert dispatch. The MoE block owns no expert weights: it asks an ExpertProvider for them,
so the offload engine can decide where each expert lives and when it moves."""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from ..spec import ExpertSpec, RouterSpec


def route(x: torch.Tensor, w: dict[str, torch.Tensor], r: RouterSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, H] -> (weights [N, k] fp32, expert ids [N, k])."""
    if r.scoring == "softmax_topk_first":  # gpt-oss: top-k of the biased logits, softmax over those k
        logits = F.linear(x, w["weight"], w.get("bias"))
        top, ids = torch.topk(logits, r.top_k, dim=-1)
        return torch.softmax(top, dim=-1).float(), ids
    if r.scoring == "softmax":
        probs = torch.softmax(F.linear(x, w["weight"]).float(), dim=-1)
        top, ids = torch.topk(probs, r.top_k, dim=-1)
    else:  # sigmoid scores; the correction bias steers the choice but not the weights
        scores = F.linear(x.float(), w["weight"].float()).sigmoid()
        choice = scores + w["correction_bias"].float() if "correction_bias" in w else scores
        choice = _mask_groups(choice, r) if r.n_group > 1 else choice
        ids = torch.topk(choice, r.top_k, dim=-1, sorted=False)[1]
        top = scores.gather(1, ids)
    if r.renormalize:
        top = top / (top.sum(dim=-1, keepdim=True) + (1e-20 if r.scoring == "sigmoid" else 0.0))
    return top * r.scaling_factor, ids


def _mask_groups(choice: torch.Tensor, r: RouterSpec) -> torch.Tensor:
    """DeepSeek grouped top-k: keep the experts of the topk_group groups whose best two scores sum highest."""
    n = choice.shape[0]
    grouped = choice.view(n, r.n_group, -1)
    group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
    keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(r.topk_group, dim=-1)[1], 1).bool()
    return grouped.masked_fill(~keep[..., None], float("-inf")).view(n, -1)


def expert_mlp(x: torch.Tensor, w: dict[str, torch.Tensor], e: ExpertSpec) -> torch.Tensor:
    """One expert (or dense MLP) on x [N, H]: SwiGLU, or gpt-oss's clamped variant with biases."""
    gate = F.linear(x, w["gate"], w.get("gate_bias"))
    up = F.linear(x, w["up"], w.get("up_bias"))
    if e.activation == "swiglu":
        hidden = F.silu(gate) * up
    else:
        gate = gate.clamp(max=e.limit)
        up = up.clamp(-e.limit, e.limit)
        hidden = (up + 1) * gate * torch.sigmoid(gate * e.alpha)
    return F.linear(hidden, w["down"], w.get("down_bias"))


class ExpertProvider(Protocol):
    """Where expert weights come from. `fetch` returns the weights of the given experts of one layer, ready
    on the compute device; an engine may load, cache or prefetch them, but must return exact weights."""

    def fetch(self, layer: int, experts: list[int]) -> dict[int, dict[str, torch.Tensor]]: ...


def moe(x: torch.Tensor, layer: int, router_w: dict[str, torch.Tensor], r: RouterSpec, e: ExpertSpec,
        provider: ExpertProvider) -> torch.Tensor:
    """x [B, T, H] -> [B, T, H]: route every token, run each hit expert once on its tokens, sum weighted."""
    flat = x.reshape(-1, x.shape[-1])
    weights, ids = route(flat, router_w, r)
    hit = torch.unique(ids).tolist()  # the single host sync of the layer
    experts = provider.fetch(layer, hit)
    out = torch.zeros_like(flat)
    for expert in hit:
        token, slot = torch.where(ids == expert)
        y = expert_mlp(flat[token], experts[expert], e) * weights[token, slot, None]
        out.index_add_(0, token, y.to(out.dtype))
    return out.view_as(x)
