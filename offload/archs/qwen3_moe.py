"""Qwen3-MoE: per-head q/k RMSNorm, optional dense layers (mlp_only_layers, decoder_sparse_step)."""
from ..spec import ExpertSpec, LayerSpec, ModelSpec, RouterSpec
from .base import (
    ROTARY_CACHE,
    Renamer,
    expert_count,
    flag,
    head_dim_of,
    integer,
    layer_count,
    layer_set,
    model_fields,
    plain_attention,
    renaming_converter,
    rope_params,
    rope_spec,
    silu_mlp,
    window,
)

model_type = "qwen3_moe"
DEFAULTS = dict(rms_norm_eps=1e-6, max_position_embeddings=32768)  # Qwen3MoeConfig
ignored = (ROTARY_CACHE,)


def spec(config: dict) -> ModelSpec:
    fields = model_fields(config, DEFAULTS)
    silu_mlp(config)
    n = layer_count(config)
    sliding = window(config, 4096) if flag(config, "use_sliding_window", False) else None
    rope = rope_spec(rope_params(config, 1e4), head_dim_of(config, nullable=False),
                     fields["max_position_embeddings"])
    attn = plain_attention(config, rope, window=sliding, qk_norm="head")
    dense_layers = layer_set(config, "mlp_only_layers", n)
    step = integer(config, "decoder_sparse_step", default=1)
    num_experts = expert_count(config, "num_experts", "num_local_experts", low=0)

    def mlp_kind(i: int) -> str:
        return "moe" if i not in dense_layers and num_experts > 0 and (i + 1) % step == 0 else "dense"

    layers = tuple(LayerSpec(attn, mlp_kind(i)) for i in range(n))
    if any(layer.mlp == "dense" for layer in layers):
        layers = tuple(LayerSpec(attn, layer.mlp, integer(config, "intermediate_size")) for layer in layers)
    moe = any(layer.mlp == "moe" for layer in layers)
    return ModelSpec(
        **fields, layers=layers,
        router=RouterSpec(num_experts, integer(config, "num_experts_per_tok", low=0), "softmax",
                          flag(config, "norm_topk_prob", False)) if moe else None,
        expert=ExpertSpec(integer(config, "moe_intermediate_size")) if moe else None,
    )


convert = renaming_converter(Renamer())
