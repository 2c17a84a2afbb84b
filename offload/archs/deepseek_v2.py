"""DeepSeek-V2 / V2-Lite: MLA (model/mla.py) with interleaved rotary pairs, a softmax router, greedy or
group-limited greedy (groups ranked by their best expert), shared experts, dense first layers. As in
transformers, the routed weights are scaled but never renormalised (norm_topk_prob is not read)."""
from ..spec import ModelSpec
from .base import REQUIRED, ROTARY_CACHE, Renamer, bad, model_fields, renaming_converter, silu_mlp
from .deepseek_moe import RENAMES, grouped_router, moe_model
from .mla import RENAMES as MLA_RENAMES
from .mla import mla_attention

model_type = "deepseek_v2"
DEFAULTS = dict(rms_norm_eps=1e-6, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
                routed_scaling_factor=1.0)  # DeepseekV2Config
METHODS = ("greedy", "group_limited_greedy")
ignored = (ROTARY_CACHE,)


def spec(config: dict) -> ModelSpec:
    fields = model_fields(config, DEFAULTS)
    silu_mlp(config)
    attention = mla_attention(config, fields["max_position_embeddings"], interleaved=True)
    model = moe_model(config, attention, first_dense=0, shared=2)
    router = None
    if model["expert"]:
        method = config.get("topk_method", "greedy")
        if method not in METHODS:
            raise bad("topk_method", method, f"one of {', '.join(METHODS)}")
        grouped = method == "group_limited_greedy"  # n_group / topk_group are read only then, and required
        router = grouped_router(config if grouped else {**config, "n_group": 1, "topk_group": 1}, "softmax", False,
                                DEFAULTS | dict(n_group=REQUIRED, topk_group=REQUIRED), group_score="max",
                                fp32_logits=True)
    return ModelSpec(**fields, **model, router=router)


convert = renaming_converter(Renamer(MLA_RENAMES + RENAMES))
