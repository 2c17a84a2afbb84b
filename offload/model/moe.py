"""Router and expert dispatch. The MoE block owns no expert weights: it asks an ExpertProvider for them,
so the offload engine can decide where each expert lives and when it moves."""
from __future__ import annotations

import itertools
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import Protocol

import torch
import torch.nn.functional as F

from offload.kernels import fused_moe, native
from offload.kernels.dense import linear_fp32

from ..spec import ExpertSpec, LayerSpec, RouterSpec
from .linear import linear

# Grouping stacks one copy of the expert's weights per (token, expert) pair: worth it on a GPU while that
# copy is cheaper than the kernel launches it saves. Not on a CPU: torch's bmm on a few tiny matrices costs
# ~45 us there, three times a whole F.linear (measured on the development machine).
GROUPED_MAX_BYTES = {"cuda": 256 << 20}


def route(x: torch.Tensor, w: dict[str, torch.Tensor], r: RouterSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, H] -> (weights [N, k] fp32, expert ids [N, k])."""
    if r.scoring == "softmax_topk_first":  # gpt-oss: top-k of the biased logits, softmax over those k
        logits = linear(x, w["weight"], w.get("bias"))
        top, ids = torch.topk(logits, r.top_k, dim=-1)
        return torch.softmax(top, dim=-1).float(), ids
    if r.scoring == "softmax":
        logits = linear_fp32(x, w["weight"]) if r.fp32_logits else linear(x, w["weight"]).float()
        probs = torch.softmax(logits, dim=-1)
        probs = _mask_groups(probs, r, 0.0) if r.n_group > 1 else probs  # DeepSeek-V2's group-limited greedy
        top, ids = torch.topk(probs, r.top_k, dim=-1)
    else:  # sigmoid scores; the correction bias steers the choice but not the weights
        scores = linear_fp32(x, w["weight"]).sigmoid()
        choice = scores + w["correction_bias"].float() if "correction_bias" in w else scores
        choice = _mask_groups(choice, r, float("-inf")) if r.n_group > 1 else choice
        ids = torch.topk(choice, r.top_k, dim=-1, sorted=False)[1]
        top = scores.gather(1, ids)
    if r.renormalize:
        top = top / (top.sum(dim=-1, keepdim=True) + (1e-20 if r.scoring == "sigmoid" else 0.0))
    return top * r.scaling_factor, ids


def _mask_groups(choice: torch.Tensor, r: RouterSpec, fill: float) -> torch.Tensor:
    """DeepSeek grouped top-k: keep the experts of the topk_group groups whose best two scores sum highest (V3),
    or whose best score is highest (V2); the others' scores become `fill`."""
    n = choice.shape[0]
    grouped = choice.view(n, r.n_group, -1)
    group_scores = grouped.amax(dim=-1) if r.group_score == "max" else grouped.topk(2, dim=-1)[0].sum(dim=-1)
    keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(r.topk_group, dim=-1)[1], 1).bool()
    return grouped.masked_fill(~keep[..., None], fill).view(n, -1)


def _activate(gate: torch.Tensor, up: torch.Tensor, e: ExpertSpec) -> torch.Tensor:
    if e.activation == "swiglu":
        return F.silu(gate) * up
    gate = gate.clamp(max=e.limit)  # gpt-oss
    up = up.clamp(-e.limit, e.limit)
    return (up + 1) * gate * torch.sigmoid(gate * e.alpha)


def expert_mlp(x: torch.Tensor, w: dict[str, torch.Tensor], e: ExpertSpec) -> torch.Tensor:
    """One expert (or dense MLP) on x [N, H]: SwiGLU, or gpt-oss's clamped variant with biases."""
    hidden = _activate(linear(x, w["gate"], w.get("gate_bias")), linear(x, w["up"], w.get("up_bias")), e)
    return linear(hidden, w["down"], w.get("down_bias"))


def shared_expert(x: torch.Tensor, w: dict, layer: LayerSpec) -> torch.Tensor:
    """The layer's dense shared expert (w["shared"], always resident), times sigmoid(w["shared_gate"] x) where
    it is gated (Qwen3.5)."""
    out = expert_mlp(x, w["shared"], ExpertSpec(layer.shared_expert_size))
    return torch.sigmoid(linear(x, w["shared_gate"])) * out if layer.shared_expert_gate else out


def grouped_expert_mlp(x: torch.Tensor, per_row: list[dict[str, torch.Tensor]], e: ExpertSpec,
                       rows: int = 0) -> torch.Tensor:
    """Row i of x [P, H] through expert per_row[i], all rows in one batched matmul per projection: a decode
    step's few (token, expert) pairs cost a handful of ops instead of a handful per expert."""
    return _grouped(x, {name: torch.stack([w[name] for w in per_row]) for name in per_row[0]}, e, rows)


def _grouped(x: torch.Tensor, stacked: dict[str, torch.Tensor], e: ExpertSpec, rows: int) -> torch.Tensor:
    """Row i of x [P, H] through the expert whose weights are stacked[name][i]. The batch is padded to `rows`
    (at least 2): the libraries pick their kernel, and with it the rounding, by the batch size (cuBLAS, and
    CPU torch for a batch of one), so a fixed size keeps each row's result the same whatever else shares its
    batch, and whichever way the weights were stacked (by expert id on the device, or copied from slots)."""
    n = x.shape[0]
    pad = max(rows, 2) - n
    if pad > 0:
        x = torch.cat([x, x[:1].expand(pad, -1)])
        stacked = {name: torch.cat([t, t[:1].expand(pad, *t.shape[1:])]) for name, t in stacked.items()}

    def project(name: str, v: torch.Tensor) -> torch.Tensor:
        out = torch.bmm(stacked[name], v[:, :, None])[..., 0]
        bias = f"{name}_bias"
        return out + stacked[bias] if bias in stacked else out

    return project("down", _activate(project("gate", x), project("up", x), e))[:n]


def device_stacks(provider: ExpertProvider, layer: int, pairs: int,
                  device: torch.device) -> dict[str, torch.Tensor] | None:
    """The layer's experts stacked on `device` ([E, ...] per weight) when the provider keeps them so and
    `pairs` (token, expert) pairs are few enough to group (the limit `_run_batch` applies); else None."""
    stacks = provider.stacked(layer) if hasattr(provider, "stacked") else None
    if stacks is None or pairs * sum(t[0].nbytes for t in stacks.values()) > GROUPED_MAX_BYTES.get(device.type, 0):
        return None
    return stacks


def moe_on_device(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, stacks: dict[str, torch.Tensor],
                  e: ExpertSpec) -> torch.Tensor:
    """`moe` for experts stacked per layer on the compute device ([E, ...] per weight): each (token, expert)
    pair's weights gathered by id, with no host sync, so a decode step can be captured in a CUDA graph. Every
    pair is computed as `_run_batch`'s grouped product computes it, so the output is `moe`'s bit for bit."""
    flat = x.reshape(-1, x.shape[-1])
    pairs = ids.numel()
    chosen = ids.flatten()
    rows = flat.repeat_interleave(ids.shape[1], dim=0)  # pair p belongs to token p // k
    return _combine(_grouped(rows, {name: t[chosen] for name, t in stacks.items()}, e, pairs), weights, ids, x)


class HostBatch(list):
    """A provider's batch of experts whose weights stay in host memory: `moe` computes it on the host worker
    while the caller goes on with the device's batches (a CPU + GPU split), so its weights must stay valid
    for the whole layer, not only until the next batch is asked for."""


_HOST_WORKER: list[ThreadPoolExecutor] = []


def host_worker() -> ThreadPoolExecutor:
    """The one thread that computes host batches (started on first use): one layer's host experts at a time,
    in the order the layers submit them."""
    if not _HOST_WORKER:
        _HOST_WORKER.append(ThreadPoolExecutor(1, thread_name_prefix="offload-host-experts"))
    return _HOST_WORKER[0]


class ExpertProvider(Protocol):
    """Where expert weights come from. `provide` yields batches of (expert, weights), every expert in
    `experts` once over all batches (any order; weights on the compute device, or on the host to compute a
    miss there; a HostBatch is computed on the host worker, concurrently with the batches after it);
    a batch's weights stay valid until the next batch is asked for;
    `weights`/`tokens`: routing mass and token count per expert; `prefetch` lists (layer, experts)
    predicted for later layers. An engine may load, cache or prefetch, but must yield exact weights.
    `call()` is a context manager around each model call, in which the provider can roll back a call that
    did not finish."""

    def provide(self, layer: int, experts: list[int], weights: list[float], tokens: list[int],
                prefetch: list[tuple[int, list[int]]]) -> Iterator[list[tuple[int, dict[str, torch.Tensor]]]]: ...

    def call(self) -> AbstractContextManager: ...


def expert_scores(weights: torch.Tensor, ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Total routing weight each expert receives over all tokens: [E]."""
    return torch.zeros(num_experts, device=ids.device).index_add_(0, ids.flatten(), weights.flatten().float())


def moe(x: torch.Tensor, layer: int, weights: torch.Tensor, ids: torch.Tensor, r: RouterSpec, e: ExpertSpec,
        provider: ExpertProvider, predictions: list[tuple[int, torch.Tensor]], prefetch_count: int) -> torch.Tensor:
    """x [B, T, H] routed by (weights, ids) [N, k] -> [B, T, H]. Each hit expert runs once on its tokens;
    outputs are gathered by expert id, not in the order the provider yields them, and each token sums its
    k weighted outputs in one reduction, so the result does not depend on where experts live.
    `predictions`: (later layer, expert scores [E]). The weighting and the sum are one op each per layer.
    A provider whose layer is stacked on the device (`stacked`) and small enough to group takes
    `moe_on_device`: the same products, without the host sync."""
    stacks = None if predictions else device_stacks(provider, layer, ids.numel(), x.device)
    if stacks is not None:
        return moe_on_device(x, weights, ids, stacks, e)
    if x.device.type == "cpu" and ids.shape[0] <= fused_moe.MAX_TOKENS and hasattr(provider, "native_table") \
            and (gemv := native.gemv()) is not None:
        found = provider.native_table(layer, gemv, x.shape[-1], e.intermediate_size)
        if found is not None:
            return _moe_native(x, weights, ids, found, r, e, gemv)
    flat = x.reshape(-1, x.shape[-1])
    hit, mass, tokens, prefetch = host_routing(weights, ids, r, predictions, prefetch_count)
    # (token, slot) pairs sorted by expert: each expert's pairs are one span of `order`, found from the counts
    order = torch.argsort(ids.flatten(), stable=True)
    spans = {ex: slice(a, a + n) for ex, a, n in zip(hit, itertools.accumulate(tokens, initial=0), tokens)}
    pairs = torch.empty(ids.numel(), flat.shape[-1], dtype=flat.dtype, device=flat.device)
    on_host: list[tuple[torch.Tensor, Future]] = []
    for batch in provider.provide(layer, hit, mass, tokens, prefetch):
        batch.sort(key=lambda p: p[0])  # expert order, as in `order`
        if len(batch) == len(hit):
            where = order
        else:
            where = order[[i for ex, _ in batch for i in range(spans[ex].start, spans[ex].stop)]]
        counts = [spans[ex].stop - spans[ex].start for ex, _ in batch]
        args = ([w for _, w in batch], counts, e, ids.shape)
        if isinstance(batch, HostBatch):  # its rows cross to the host once; the device's batches go on meanwhile
            on_host.append((where, host_worker().submit(run_on_host, torch.get_num_threads(), flat[where // ids.shape[1]].to("cpu"), *args)))
        else:
            pairs[where] = _run_batch(flat[where // ids.shape[1]], *args)
    for where, job in on_host:
        pairs[where] = job.result().to(pairs.device, non_blocking=True)
    return _combine(pairs, weights, ids, x)


def host_routing(weights: torch.Tensor, ids: torch.Tensor, r: RouterSpec, predictions: list[tuple[int, torch.Tensor]],
                 prefetch_count: int) -> tuple[list[int], list[float], list[int], list[tuple[int, list[int]]]]:
    """What a provider needs of a layer's routing, in the layer's one host sync: the experts hit (ascending),
    their routing mass and token counts, and the `prefetch_count` likeliest experts of each predicted layer."""
    counts = torch.bincount(ids.flatten(), minlength=r.num_experts)
    rows = torch.stack([counts.float(), expert_scores(weights, ids, r.num_experts), *[p for _, p in predictions]])
    table = rows.tolist()
    hit = [i for i in range(r.num_experts) if table[0][i] > 0]
    prefetch = [(later, top_experts(scores, prefetch_count)) for (later, _), scores in zip(predictions, table[2:])]
    return hit, [table[1][i] for i in hit], [int(table[0][i]) for i in hit], prefetch


def _combine(pairs: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Pair outputs [N * k, H] (x's dtype, pair p = token p // k) -> each token's k outputs weighted and summed in
    one reduction, in x's dtype and shape: no scatter-add, so deterministic on CUDA too, and one place for every
    path, so their bits agree."""
    return (pairs.view(*ids.shape, -1) * weights[..., None]).sum(1).to(x.dtype).view_as(x)


def _moe_native(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, found: tuple, r: RouterSpec,
                e: ExpertSpec, gemv) -> torch.Tensor:
    """`moe` for a provider holding every expert in a form our CPU kernel reads: the routing goes to the kernel
    as it is (moe_pairs groups the pairs itself), so a decode step's layer is one native call and a few torch
    ops instead of ~30 and the Python between them. Each pair's output is the one `_fused_rows` gives it,
    rounded and weighted as `moe` does: the same bits."""
    table, stride = found
    flat = x.reshape(-1, x.shape[-1])
    pairs = gemv.moe_pairs(flat.float().contiguous(), ids.contiguous(), table, r.num_experts, e.intermediate_size,
                           e.activation == "swiglu_clamp", e.alpha, e.limit, stride)[:, :flat.shape[-1]]
    return _combine(pairs.to(flat.dtype), weights, ids, x)


def run_on_host(threads: int, *args) -> torch.Tensor:
    """A HostBatch's job on the host worker (also what the planner times as the CPU's expert throughput):
    _run_batch with the caller's torch threads and in inference mode, both per thread and not inherited (a
    product's rounding depends on how many threads split it)."""
    torch.set_num_threads(threads)
    with torch.inference_mode():
        return _run_batch(*args)


def _run_batch(x: torch.Tensor, experts: list[dict[str, torch.Tensor]], counts: list[int], e: ExpertSpec,
               routed: torch.Size) -> torch.Tensor:
    """x [P, H]: rows grouped by expert, counts[i] rows for experts[i]; routed: the layer's [tokens, k].
    Small dense experts on the compute device run as one grouped product; at decode sizes every expert whose
    weights are on the CPU in a form our kernel reads runs in one native call; others one by one (a miss may
    run on the host where it lives). Each choice depends on the layer's routing and the expert's own weights,
    not on how the provider batched its experts, so resident and offloaded runs compute every pair the same way."""
    layer_pairs = routed.numel()
    limit = GROUPED_MAX_BYTES.get(x.device.type, 0)
    if limit and all(_groupable(w, x.device) for w in experts) and layer_pairs * _nbytes(experts[0]) <= limit:
        return grouped_expert_mlp(x, [w for w, n in zip(experts, counts) for _ in range(n)], e, layer_pairs)
    starts = list(itertools.accumulate(counts, initial=0))
    fused = _fused_rows(x, experts, counts, starts, e) if routed[0] <= fused_moe.MAX_TOKENS else {}
    outputs = []
    for i, (w, n) in enumerate(zip(experts, counts)):
        if i in fused:
            outputs.append(fused[i])
            continue
        where = getattr(w["down"], "device", x.device)
        outputs.append(expert_mlp(x[starts[i]:starts[i] + n].to(where), w, e).to(x.device))
    return torch.cat(outputs)


def _fused_rows(x: torch.Tensor, experts: list[dict], counts: list[int], starts: list[int],
                e: ExpertSpec) -> dict[int, torch.Tensor]:
    """Outputs [counts[i], H] (x's dtype and device) of the experts our fused CPU kernel serves, by index."""
    gemv = native.gemv()
    if gemv is None:
        return {}
    hidden = x.shape[1]
    found = [(i, d) for i, w in enumerate(experts)
             if (d := fused_moe.descriptor(w, gemv, hidden, e.intermediate_size)) is not None]
    if not found:
        return {}
    if len(found) == len(experts):
        rows = x
    else:
        rows = torch.cat([x[starts[i]:starts[i] + counts[i]] for i, _ in found])
    out = fused_moe.run(rows.to("cpu"), [d for _, d in found], [counts[i] for i, _ in found], e.intermediate_size,
                        e.activation == "swiglu_clamp", e.alpha, e.limit, gemv).to(x.device, x.dtype)
    return dict(zip((i for i, _ in found), out.split([counts[i] for i, _ in found])))


def _groupable(w: dict, device: torch.device) -> bool:
    return all(isinstance(t, torch.Tensor) and t.device == device for t in w.values())


def _nbytes(w: dict[str, torch.Tensor]) -> int:
    return sum(t.nbytes for t in w.values())


def top_experts(scores: list[float], n: int) -> list[int]:
    """The n experts with the highest positive scores, best first."""
    ranked = sorted((i for i in range(len(scores)) if scores[i] > 0), key=lambda i: -scores[i])
    return ranked[:n]
