"""OLMoE: q/k RMSNorm over the whole projection (not per head), optional clip_qkv, no sliding window."""
from ..spec import ExpertSpec, LayerSpec, ModelSpec, RouterSpec
from .base import Renamer, head_dim_of, model_fields, need, plain_attention, renaming_converter, rope_params, rope_spec

model_type = "olmoe"


def spec(config: dict) -> ModelSpec:
    attn = plain_attention(config, rope_spec(rope_params(config, 1e4), head_dim_of(config)),
                           qk_norm="full", clip_qkv=config.get("clip_qkv"))
    return ModelSpec(
        **model_fields(config, 1e-5),
        layers=tuple(LayerSpec(attn, "moe") for _ in range(need(config, "num_hidden_layers"))),
        router=RouterSpec(need(config, "num_experts", "num_local_experts"), need(config, "num_experts_per_tok"),
                          "softmax", bool(config.get("norm_topk_prob", False))),
        expert=ExpertSpec(need(config, "intermediate_size")),
    )


convert = renaming_converter(Renamer())
