"""`offload-bench deltanet`: the gated delta rule of one Gated DeltaNet layer (Qwen3.5-MoE's linear attention),
ours (offload.model.linear_attention) against transformers' torch path (its fallback when flash-linear-attention
is absent, as on every CPU), on the same inputs: the chunked form over a prompt (tokens/s) and the recurrent form
for one decode step (steps/s). Interleaved, medians of `runs`; the outputs are compared too."""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from offload.model.linear_attention import chunked_delta_rule, recurrent_delta_rule


def _inputs(tokens: int, heads: int, dk: int, dv: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Ours take q, k, v [B, H, T, D] (q, k L2-normed, q scaled) and g, beta [B, H, T]; transformers' the same
    as [B, T, H, D] before its own norm: return the latter, un-normed."""
    q, k = (torch.randn(1, tokens, heads, dk, generator=g) for _ in range(2))
    v = torch.randn(1, tokens, heads, dv, generator=g)
    decay = -F.softplus(torch.randn(1, tokens, heads, generator=g))
    beta = torch.rand(1, tokens, heads, generator=g)
    return q, k, v, decay, beta


def _ours(q, k, v, decay, beta, state, chunked: bool):
    norm = [F.normalize(t.transpose(1, 2), dim=-1, eps=1e-6) for t in (q, k)]
    q, k = norm[0] * q.shape[-1] ** -0.5, norm[1]
    args = (q, k, v.transpose(1, 2), decay.transpose(1, 2), beta.transpose(1, 2), state)
    out = chunked_delta_rule(*args)[0] if chunked else recurrent_delta_rule(*args)[0]
    return out.transpose(1, 2)


def _theirs(q, k, v, decay, beta, state, chunked: bool):
    from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as m

    rule = m.torch_chunk_gated_delta_rule if chunked else m.torch_recurrent_gated_delta_rule
    return rule(q, k, v, g=decay, beta=beta, initial_state=state, output_final_state=True,
                use_qk_l2norm_in_kernel=True)[0]


def run(prompt: int = 512, heads: int = 32, dk: int = 128, dv: int = 128, runs: int = 5,
        threads: int = 2) -> dict:
    """Defaults: one layer of Qwen3.5-35B-A3B (32 value heads, 128 x 128 state per head)."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    cases = {"prefill": (_inputs(prompt, heads, dk, dv, g), True), "decode": (_inputs(1, heads, dk, dv, g), False)}
    state = torch.randn(1, heads, dk, dv, generator=g) * 0.1
    results = {}
    for case, (inputs, chunked) in cases.items():
        times: dict[str, list[float]] = {"ours": [], "transformers": []}
        outs = {}
        for _ in range(runs + 1):  # the first round warms up
            for name, fn in (("ours", _ours), ("transformers", _theirs)):
                start = time.perf_counter()
                outs[name] = fn(*inputs, state.clone(), chunked)
                times[name].append(time.perf_counter() - start)
        n = inputs[0].shape[1]
        rate = {name: n / statistics.median(t[1:]) for name, t in times.items()}
        diff = (outs["ours"] - outs["transformers"]).abs().max().item()
        results[case] = rate | {"ratio": rate["ours"] / rate["transformers"], "max_abs_diff": diff}
    return {"prompt": prompt, "heads": heads, "dk": dk, "dv": dv, "runs": runs, "threads": threads} | results
