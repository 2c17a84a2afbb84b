"""Qwen3-MoE: per-head q/k RMSNorm, optional dense layers (mlp_only_layers, decoder_sparse_step)."""
from ..spec import ExpertSpec, LayerSpec, ModelSpec, RouterSpec
from .base import Renamer, head_dim_of, model_fields, need, plain_attention, renaming_converter, rope_params, rope_spec

model_type = "qwen3_moe"


def spec(config: dict) -> ModelSpec:
    window = config.get("sliding_window") if config.get("use_sliding_window") else None
    attn = plain_attention(config, rope_spec(rope_params(config, 1e4), head_dim_of(config)),
                           window=window, qk_norm="head")
    dense_layers = set(config.get("mlp_only_layers") or [])
    step = config.get("decoder_sparse_step", 1) or 1
    num_experts = need(config, "num_experts", "num_local_experts")

    def mlp_kind(i: int) -> str:
        return "moe" if i not in dense_layers and num_experts > 0 and (i + 1) % step == 0 else "dense"

    return ModelSpec(
        **model_fields(config, 1e-6),
        layers=tuple(LayerSpec(attn, mlp_kind(i), config.get("intermediate_size", 0))
                     for i in range(need(config, "num_hidden_layers"))),
        router=RouterSpec(num_experts, need(config, "num_experts_per_tok"), "softmax",
                          bool(config.get("norm_topk_prob", False))),
        expert=ExpertSpec(need(config, "moe_intermediate_size")),
    )


convert = renaming_converter(Renamer())
