"""Router and expert dispatch. The MoE block owns no expert weights: it asks an ExpertProvider for them,
so the offload engine can decide where each expert lives and when it moves."""
from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Protocol

import torch
import torch.nn.functional as F

from ..spec import ExpertSpec, RouterSpec
from .linear import linear


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
    gate = linear(x, w["gate"], w.get("gate_bias"))
    up = linear(x, w["up"], w.get("up_bias"))
    if e.activation == "swiglu":
        hidden = F.silu(gate) * up
    else:
        gate = gate.clamp(max=e.limit)
        up = up.clamp(-e.limit, e.limit)
        hidden = (up + 1) * gate * torch.sigmoid(gate * e.alpha)
    return linear(hidden, w["down"], w.get("down_bias"))


class ExpertProvider(Protocol):
    """Where expert weights come from. `provide` yields (expert, weights) for every expert in `experts`
    (any order, each once; weights on the compute device, or on the host to compute a miss there);
    `weights`/`tokens`: routing mass and token count per expert; `prefetch` lists (layer, experts)
    predicted for later layers. An engine may load, cache or prefetch, but must yield exact weights."""

    def provide(self, layer: int, experts: list[int], weights: list[float], tokens: list[int],
                prefetch: list[tuple[int, list[int]]]) -> Iterator[tuple[int, dict[str, torch.Tensor]]]: ...


def expert_scores(weights: torch.Tensor, ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Total routing weight each expert receives over all tokens: [E]."""
    return torch.zeros(num_experts, device=ids.device).index_add_(0, ids.flatten(), weights.flatten().float())


def moe(x: torch.Tensor, layer: int, weights: torch.Tensor, ids: torch.Tensor, r: RouterSpec, e: ExpertSpec,
        provider: ExpertProvider, predictions: list[tuple[int, torch.Tensor]], prefetch_count: int) -> torch.Tensor:
    """x [B, T, H] routed by (weights, ids) [N, k] -> [B, T, H]. Each hit expert runs once on its tokens;
    outputs are gathered by expert id, not in the order the provider yields them, and each token sums its
    k weighted outputs in one reduction, so the result does not depend on where experts live.
    `predictions`: (later layer, expert scores [E]). Per expert it costs a slice, a gather and the MLP;
    the weighting and the sum are one op each per layer."""
    flat = x.reshape(-1, x.shape[-1])
    counts = torch.bincount(ids.flatten(), minlength=r.num_experts)
    rows = torch.stack([counts.float(), expert_scores(weights, ids, r.num_experts), *[p for _, p in predictions]])
    table = rows.tolist()  # the single host sync of the layer
    hit = [i for i in range(r.num_experts) if table[0][i] > 0]
    prefetch = [(later, top_experts(scores, prefetch_count)) for (later, _), scores in zip(predictions, table[2:])]
    tokens = [int(table[0][i]) for i in hit]
    # (token, slot) pairs sorted by expert: each expert's tokens are one slice, found from the counts
    order = torch.argsort(ids.flatten(), stable=True)
    token_of = order // ids.shape[1]
    spans = {e: slice(a, a + n) for e, a, n in zip(hit, itertools.accumulate(tokens, initial=0), tokens)}
    outputs = {}
    for expert, w in provider.provide(layer, hit, [table[1][i] for i in hit], tokens, prefetch):
        token = token_of[spans[expert]]
        where = getattr(w["down"], "device", flat.device)  # a miss may be computed on the host, where it lives
        outputs[expert] = expert_mlp(flat[token].to(where), w, e).to(flat.device)
    pairs = torch.empty(ids.numel(), flat.shape[-1], dtype=outputs[hit[0]].dtype, device=flat.device)
    pairs[order] = torch.cat([outputs[i] for i in hit])  # back in (token, slot) order; no row written twice
    out = (pairs.view(*ids.shape, -1) * weights[..., None]).sum(1)  # no scatter-add: deterministic on CUDA too
    return out.to(flat.dtype).view_as(x)


def top_experts(scores: list[float], n: int) -> list[int]:
    """The n experts with the highest positive scores, best first."""
    ranked = sorted((i for i in range(len(scores)) if scores[i] > 0), key=lambda i: -scores[i])
    return ranked[:n]
