"""GLM-4.5 / 4.6 / Air: partial rotary (half the head by default), optional per-head q/k norm, q/k/v biases
without an o bias, DeepSeek-V3's sigmoid router with correction bias, shared experts, dense first layers."""
from ..spec import ModelSpec
from .base import (
    ROTARY_CACHE,
    Renamer,
    flag,
    head_dim_of,
    model_fields,
    mtp_converter,
    plain_attention,
    rope_params,
    rope_spec,
    silu_mlp,
)
from .deepseek_moe import MTP_COPIES, RENAMES, moe_model, sigmoid_router

model_type = "glm4_moe"
DEFAULTS = dict(rms_norm_eps=1e-5, max_position_embeddings=131072, n_group=1, topk_group=1,
                routed_scaling_factor=1.0)  # Glm4MoeConfig
ignored = (ROTARY_CACHE, MTP_COPIES)
mtp_after_decoder = True  # the MTP layer is published as model.layers.{num_hidden_layers}.* (loader.py)


def spec(config: dict) -> ModelSpec:
    fields = model_fields(config, DEFAULTS)
    silu_mlp(config)
    # transformers' Glm4MoeAttention reads config.head_dim when set, else hidden_size / heads; null breaks it
    rope = rope_spec(rope_params(config, 1e4), head_dim_of(config, None, nullable=False),
                     fields["max_position_embeddings"], default_partial=0.5)
    attention = plain_attention(config, rope, o_bias=False,
                                qk_norm="head" if flag(config, "use_qk_norm", False) else "none")
    model = moe_model(config, attention, first_dense=1, shared=1)
    return ModelSpec(**fields, **model, router=sigmoid_router(config, DEFAULTS) if model["expert"] else None)


convert = mtp_converter(Renamer(RENAMES))
