"""The rules between config fields that every architecture shares, checked once on the ModelSpec an adapter
built (fields are named as transformers names them); a spec that passes describes a model transformers
would run the same way."""
from __future__ import annotations

from ..spec import LinearAttentionSpec, ModelSpec
from .base import bad


def check(spec: ModelSpec) -> ModelSpec:
    for layer in spec.layers:
        a = layer.attention
        if isinstance(a, LinearAttentionSpec):
            if a.num_v_heads % a.num_k_heads:
                raise bad("linear_num_key_heads", a.num_k_heads, f"a divisor of linear_num_value_heads={a.num_v_heads}")
            continue
        if a.num_heads % a.num_kv_heads:
            kind = "sliding-window" if a.window else "full-attention"
            raise bad("num_key_value_heads", a.num_kv_heads, f"a divisor of num_attention_heads={a.num_heads} "
                      f"(the key/value heads of its {kind} layers)")
    if spec.moe_layers:
        _check_router(spec)
    return spec


def _check_router(spec: ModelSpec) -> None:
    r = spec.router
    if not 1 <= r.top_k <= r.num_experts:
        raise bad("num_experts_per_tok", r.top_k, f"between 1 and the {r.num_experts} routed experts")
    if r.scoring != "sigmoid" and r.n_group == 1:  # only DeepSeek-style routers read n_group / topk_group
        return
    per_group = r.num_experts // r.n_group
    least = 2 if r.group_score == "top2_sum" else 1
    if r.num_experts % r.n_group or per_group < least:
        raise bad("n_group", r.n_group, f"a divisor of the {r.num_experts} routed experts that leaves at least "
                  f"{least} per group (grouped top-k ranks a group by its best {'two' if least == 2 else 'one'})")
    if not 1 <= r.topk_group <= r.n_group or r.top_k > r.topk_group * per_group:
        raise bad("topk_group", r.topk_group, f"between 1 and n_group={r.n_group}, and its groups must hold the "
                  f"num_experts_per_tok={r.top_k} experts chosen ({per_group} per group)")
