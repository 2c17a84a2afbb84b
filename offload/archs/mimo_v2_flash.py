"""MiMo-V2-Flash: hybrid sliding/full attention (layer_types), twice the KV heads and sinks on sliding layers,
partial rotary with a theta per layer type, scaled values, a sigmoid router whose correction bias only
steers the selection, dense layers from mlp_layer_types, and MTP tensors under `model.mtp.*`."""
from ..spec import ExpertSpec, LayerSpec, ModelSpec, RouterSpec
from .base import (
    COMMON_LAYER_RENAMES,
    Converted,
    ReadTensor,
    Renamer,
    head_dim_of,
    model_fields,
    need,
    plain_attention,
    rope_spec,
)

model_type = "mimo_v2_flash"


def spec(config: dict) -> ModelSpec:
    n = need(config, "num_hidden_layers")
    layer_types = config.get("layer_types") or [
        "full_attention" if i == 0 or (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)]
    mlp_types = config.get("mlp_layer_types") or ["dense"] + ["sparse"] * (n - 1)
    rope = need(config, "rope_parameters")
    kv = need(config, "num_key_value_heads")
    value_scale = config.get("attention_value_scale")
    attn = {}
    for kind in set(layer_types):
        swa = kind == "sliding_attention"
        attn[kind] = plain_attention(
            config, rope_spec(rope[kind], head_dim_of(config), default_partial=0.334),
            num_kv_heads=2 * kv if swa else kv, v_head_dim=need(config, "v_head_dim"), o_bias=False,
            window=config.get("sliding_window") if swa else None, sinks=swa,
            value_scale=1.0 if value_scale is None else value_scale)
    return ModelSpec(
        **model_fields(config, 1e-5),
        layers=tuple(LayerSpec(attn[kind], "moe" if mlp == "sparse" else "dense", need(config, "intermediate_size"))
                     for kind, mlp in zip(layer_types, mlp_types)),
        router=RouterSpec(need(config, "n_routed_experts"), need(config, "num_experts_per_tok"), "sigmoid",
                          bool(config.get("norm_topk_prob", True)),
                          scaling_factor=config.get("routed_scaling_factor") or 1.0, correction_bias=True,
                          n_group=config.get("n_group") or 1, topk_group=config.get("topk_group") or 1),
        expert=ExpertSpec(need(config, "moe_intermediate_size")),
    )


_rename = Renamer([(r"self_attn\.attention_sink_bias", "attn.sinks"), *COMMON_LAYER_RENAMES])


def convert(name: str, read: ReadTensor) -> Converted:
    if name.startswith("model.mtp."):  # kept for multi-token prediction; not part of the main decoder
        return [("mtp." + name[len("model.mtp."):], read(name))]
    canonical = _rename(name)
    return [] if canonical is None else [(canonical, read(name))]
