"""MiMo-V2-Flash: hybrid sliding/full attention (layer_types), twice the KV heads and sinks on sliding layers,
partial rotary with a theta per layer type, scaled values, a sigmoid router whose correction bias only
steers the selection, dense layers from mlp_layer_types, and MTP tensors under `model.mtp.*`."""
from ..spec import ExpertSpec, LayerSpec, ModelSpec, RouterSpec
from .base import (
    COMMON_LAYER_RENAMES,
    ROTARY_CACHE,
    Renamer,
    expert_count,
    flag,
    head_dim_of,
    integer,
    kinds,
    layer_count,
    model_fields,
    mtp_converter,
    number,
    plain_attention,
    rope_spec,
    silu_mlp,
    window,
)

model_type = "mimo_v2_flash"
# MiMoV2FlashConfig's defaults (the released model's)
DEFAULTS = dict(rms_norm_eps=1e-5, max_position_embeddings=131072, bos_token_id=1)
DEFAULT_ROPE = {"full_attention": {"rope_type": "default", "rope_theta": 5_000_000.0, "partial_rotary_factor": 0.334},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.334}}
ignored = (ROTARY_CACHE,)


def _window(config: dict) -> int | None:
    """MiMo's own configs give sliding_window_size, the keys before the query: transformers adds the query."""
    size = integer(config, "sliding_window_size", default=None, null=None, low=0)
    return window(config, 129, nullable=False) if size is None else size + 1


def spec(config: dict) -> ModelSpec:
    fields = model_fields(config, DEFAULTS)
    silu_mlp(config)
    n = layer_count(config)
    layer_types = kinds(config, "layer_types", n, ("sliding_attention", "full_attention"),
                        ["full_attention" if i == 0 or (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)])
    mlp_types = kinds(config, "mlp_layer_types", n, ("dense", "sparse"), ["dense"] + ["sparse"] * (n - 1))
    # transformers' setter for the older name rope_scaling replaces rope_parameters whenever it is set, null too
    if "rope_scaling" in config:
        rope = config["rope_scaling"]
    else:
        rope = DEFAULT_ROPE if config.get("rope_parameters") is None else config["rope_parameters"]
    kv = integer(config, "num_key_value_heads")
    sliding = _window(config)
    head_dim = head_dim_of(config, 192, nullable=False)
    attn = {}
    for kind in set(layer_types):
        swa = kind == "sliding_attention"
        attn[kind] = plain_attention(
            config, rope_spec(rope.get(kind) if isinstance(rope, dict) else rope, head_dim,
                              fields["max_position_embeddings"], default_partial=0.334, label=kind),
            num_kv_heads=2 * kv if swa else kv, v_head_dim=integer(config, "v_head_dim"), o_bias=False,
            window=sliding if swa else None, sinks=swa,
            value_scale=number(config, "attention_value_scale", default=0.707, null=1.0))
    moe = "sparse" in mlp_types
    return ModelSpec(
        **fields,
        layers=tuple(LayerSpec(attn[kind], "moe" if mlp == "sparse" else "dense",
                               integer(config, "intermediate_size") if mlp == "dense" else 0)
                     for kind, mlp in zip(layer_types, mlp_types)),
        router=RouterSpec(expert_count(config, "n_routed_experts", "num_local_experts"),
                          integer(config, "num_experts_per_tok", low=0), "sigmoid",
                          flag(config, "norm_topk_prob", True),
                          scaling_factor=number(config, "routed_scaling_factor", default=1.0, null=1.0),
                          correction_bias=True, n_group=integer(config, "n_group", default=1),
                          topk_group=integer(config, "topk_group", default=1)) if moe else None,
        expert=ExpertSpec(integer(config, "moe_intermediate_size")) if moe else None,
    )


convert = mtp_converter(Renamer([(r"self_attn\.attention_sink_bias", "attn.sinks"), *COMMON_LAYER_RENAMES]))
