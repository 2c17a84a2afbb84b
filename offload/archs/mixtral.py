"""Mixtral: softmax router over all experts, top-k renormalised, optional sliding window everywhere."""
from ..spec import ExpertSpec, LayerSpec, ModelSpec, RouterSpec
from .base import (
    COMMON_LAYER_RENAMES,
    ROTARY_CACHE,
    Renamer,
    expert_count,
    head_dim_of,
    integer,
    layer_count,
    model_fields,
    plain_attention,
    renaming_converter,
    rope_params,
    rope_spec,
    silu_mlp,
    window,
)

model_type = "mixtral"
DEFAULTS = dict(rms_norm_eps=1e-5, max_position_embeddings=4096 * 32, bos_token_id=1, eos_token_id=2)  # MixtralConfig
ignored = (ROTARY_CACHE,)


def spec(config: dict) -> ModelSpec:
    fields = model_fields(config, DEFAULTS)
    silu_mlp(config)
    rope = rope_spec(rope_params(config, 1e6), head_dim_of(config), fields["max_position_embeddings"])
    attn = plain_attention(config, rope, window=window(config, None))
    return ModelSpec(
        **fields,
        layers=tuple(LayerSpec(attn, "moe") for _ in range(layer_count(config))),
        router=RouterSpec(expert_count(config, "num_local_experts", "num_experts"),
                          integer(config, "num_experts_per_tok", low=0),
                          "softmax", True),
        expert=ExpertSpec(integer(config, "intermediate_size")),
    )


convert = renaming_converter(Renamer([
    (r"block_sparse_moe\.experts\.(\d+)\.w1\.weight", r"experts.\1.gate"),
    (r"block_sparse_moe\.experts\.(\d+)\.w3\.weight", r"experts.\1.up"),
    (r"block_sparse_moe\.experts\.(\d+)\.w2\.weight", r"experts.\1.down"),
    (r"block_sparse_moe\.gate\.weight", "router.weight"),
    *COMMON_LAYER_RENAMES,
]))
