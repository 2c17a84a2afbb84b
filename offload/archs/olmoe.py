"""OLMoE: q/k RMSNorm over the whole projection (not per head), optional clip_qkv, no sliding window."""
from ..spec import ExpertSpec, LayerSpec, ModelSpec, RouterSpec
from .base import (
    ROTARY_CACHE,
    Renamer,
    expert_count,
    flag,
    head_dim_of,
    integer,
    layer_count,
    model_fields,
    number,
    plain_attention,
    renaming_converter,
    rope_params,
    rope_spec,
    silu_mlp,
)

model_type = "olmoe"
DEFAULTS = dict(rms_norm_eps=1e-5, max_position_embeddings=4096, pad_token_id=1, eos_token_id=50279)  # OlmoeConfig
ignored = (ROTARY_CACHE,)


def spec(config: dict) -> ModelSpec:
    fields = model_fields(config, DEFAULTS)
    silu_mlp(config)
    rope = rope_spec(rope_params(config, 1e4), head_dim_of(config, nullable=False),
                     fields["max_position_embeddings"])
    attn = plain_attention(config, rope, qk_norm="full", clip_qkv=number(config, "clip_qkv", default=None,
                                                                          null=None, positive=True))
    return ModelSpec(
        **fields,
        layers=tuple(LayerSpec(attn, "moe") for _ in range(layer_count(config))),
        router=RouterSpec(expert_count(config, "num_experts", "num_local_experts"),
                          integer(config, "num_experts_per_tok", low=0), "softmax",
                          flag(config, "norm_topk_prob", False)),
        expert=ExpertSpec(integer(config, "intermediate_size")),
    )


convert = renaming_converter(Renamer())
