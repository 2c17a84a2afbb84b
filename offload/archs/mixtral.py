"""Mixtral: softmax router over all experts, top-k renormalised, optional sliding window everywhere."""
from ..spec import ExpertSpec, LayerSpec, ModelSpec, RouterSpec
from .base import (
    COMMON_LAYER_RENAMES,
    Renamer,
    head_dim_of,
    model_fields,
    need,
    plain_attention,
    renaming_converter,
    rope_params,
    rope_spec,
)

model_type = "mixtral"


def spec(config: dict) -> ModelSpec:
    attn = plain_attention(config, rope_spec(rope_params(config, 1e6), head_dim_of(config)),
                           window=config.get("sliding_window"))
    return ModelSpec(
        **model_fields(config, 1e-5),
        layers=tuple(LayerSpec(attn, "moe") for _ in range(need(config, "num_hidden_layers"))),
        router=RouterSpec(need(config, "num_local_experts"), need(config, "num_experts_per_tok"), "softmax", True),
        expert=ExpertSpec(need(config, "intermediate_size")),
    )


convert = renaming_converter(Renamer([
    (r"block_sparse_moe\.experts\.(\d+)\.w1\.weight", r"experts.\1.gate"),
    (r"block_sparse_moe\.experts\.(\d+)\.w3\.weight", r"experts.\1.up"),
    (r"block_sparse_moe\.experts\.(\d+)\.w2\.weight", r"experts.\1.down"),
    (r"block_sparse_moe\.gate\.weight", "router.weight"),
    *COMMON_LAYER_RENAMES,
]))
