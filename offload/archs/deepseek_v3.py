"""DeepSeek-V3 / R1 and Kimi-K2: MLA (model/mla.py) with rope_interleave, YaRN with mscale, the sigmoid router
whose correction bias steers only the selection, groups ranked by their best two, shared experts, dense
first layers."""
from ..spec import ModelSpec
from .base import ROTARY_CACHE, Renamer, flag, model_fields, mtp_converter, silu_mlp
from .deepseek_moe import MTP_COPIES, RENAMES, moe_model, sigmoid_router
from .mla import RENAMES as MLA_RENAMES
from .mla import mla_attention

model_type = "deepseek_v3"
DEFAULTS = dict(rms_norm_eps=1e-6, max_position_embeddings=4096, bos_token_id=0, eos_token_id=1, n_group=8,
                topk_group=4, routed_scaling_factor=2.5)  # DeepseekV3Config
ignored = (ROTARY_CACHE, MTP_COPIES)
mtp_after_decoder = True  # the MTP layer is published as model.layers.{num_hidden_layers}.* (loader.py)


def spec(config: dict) -> ModelSpec:
    fields = model_fields(config, DEFAULTS)
    silu_mlp(config)
    attention = mla_attention(config, fields["max_position_embeddings"], flag(config, "rope_interleave", True))
    model = moe_model(config, attention, first_dense=3, shared=1)
    return ModelSpec(**fields, **model, router=sigmoid_router(config, DEFAULTS) if model["expert"] else None)


convert = mtp_converter(Renamer(MLA_RENAMES + RENAMES))
