"""Qwen3.5-MoE: three Gated DeltaNet (linear attention) layers to one full-attention layer (layer_types), the
full-attention layers with a sigmoid output gate (its rows interleaved per head with q_proj's),
per-head q/k norms and partial rotary; every layer MoE (softmax top-k, renormalised) plus a dense shared
expert with a sigmoid gate. RMSNorms other than the DeltaNet's output norm scale by (1 + weight): converted
here to plain weights. The multimodal checkpoints (model_type qwen3_5_moe) nest the text config under
text_config and the weights under model.language_model.*: the language model is loaded, model.visual.*
ignored. MTP tensors (`mtp.*`) are kept for multi-token prediction."""
from __future__ import annotations

import re

from ..spec import ExpertSpec, LayerSpec, LinearAttentionSpec, ModelSpec, RouterSpec
from .base import (
    ROTARY_CACHE,
    Converted,
    ReadTensor,
    Renamer,
    bad,
    expert_count,
    flag,
    head_dim_of,
    integer,
    kinds,
    layer_count,
    model_fields,
    plain_attention,
    rope_params,
    rope_spec,
    silu_mlp,
)

model_type = "qwen3_5_moe"
aliases = ("qwen3_5_moe_text",)  # the text model's own config (Qwen3_5MoeForCausalLM)
DEFAULTS = dict(rms_norm_eps=1e-6, max_position_embeddings=32768)  # Qwen3_5MoeTextConfig
ignored = (ROTARY_CACHE, r"model\.visual\..*")


def text_config(config: dict) -> dict:
    """The language model's config: the nested text_config of a multimodal checkpoint, or the config itself."""
    text = config.get("text_config")
    if text is None:
        return config
    if not isinstance(text, dict):
        raise bad("text_config", text, "an object")
    return text | {"model_type": config["model_type"]} | (
        {"tie_word_embeddings": config["tie_word_embeddings"]} if "tie_word_embeddings" in config else {})


def spec(config: dict) -> ModelSpec:
    config = text_config(config)
    fields = model_fields(config, DEFAULTS)
    silu_mlp(config)
    n = layer_count(config)
    interval = integer(config, "full_attention_interval", default=4)
    layer_types = kinds(config, "layer_types", n, ("linear_attention", "full_attention"),
                        ["full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n)])
    if flag(config, "attention_bias", False):
        raise bad("attention_bias", True, "false (Qwen3.5-MoE's attention has no biases)")
    rope = rope_spec(rope_params(config, 1e4), head_dim_of(config, 256, nullable=False),
                     fields["max_position_embeddings"], default_partial=0.25)
    full = plain_attention(config, rope, qk_norm="head", output_gate=True)
    linear = LinearAttentionSpec(
        num_k_heads=integer(config, "linear_num_key_heads"),
        num_v_heads=integer(config, "linear_num_value_heads"),
        k_head_dim=integer(config, "linear_key_head_dim"),
        v_head_dim=integer(config, "linear_value_head_dim"),
        conv_kernel=integer(config, "linear_conv_kernel_dim"))
    shared = integer(config, "shared_expert_intermediate_size")
    return ModelSpec(
        **fields,
        layers=tuple(LayerSpec(full if kind == "full_attention" else linear, "moe", shared_expert_size=shared,
                               shared_expert_gate=True) for kind in layer_types),
        router=RouterSpec(expert_count(config, "num_experts"),
                          integer(config, "num_experts_per_tok", low=0), "softmax", True),
        expert=ExpertSpec(integer(config, "moe_intermediate_size")),
    )


_rename = Renamer([
    (r"linear_attn\.in_proj_(qkv|z|a|b)\.weight", r"attn.\1"),
    (r"linear_attn\.out_proj\.weight", "attn.o"),
    (r"linear_attn\.conv1d\.weight", "attn.conv"),
    (r"linear_attn\.(A_log|dt_bias)", r"attn.\1"),
    (r"linear_attn\.norm\.weight", "attn.norm"),
    (r"mlp\.shared_expert\.(gate|up|down)_proj\.weight", r"shared.\1"),
    (r"mlp\.shared_expert_gate\.weight", "shared_gate"),
    (r"mlp\.experts\.(gate_up_proj|down_proj)", r"experts.\1"),  # fused [E, ...] experts, split below
    *Renamer().layer_renames,
])
# (1 + weight) norms; the DeltaNet's gated output norm (attn.norm) multiplies by its weight as it is
OFFSET_NORM = re.compile(r"(layers\.\d+\.)?(input_norm|post_attn_norm|norm|attn\.[qk]_norm)")


# The MTP module's own tensors, by the names offload.model.mtp gives them (as MiMo-V2-Flash's MTP layer holds them)
MTP_OWN = {"pre_fc_norm_embedding.weight": "enorm", "pre_fc_norm_hidden.weight": "hnorm", "fc.weight": "eh_proj",
           "norm.weight": "final_norm"}


def convert(name: str, read: ReadTensor) -> Converted:
    if name.startswith("mtp."):  # multi-token prediction: `mtp.` + canonical names of its one layer (mtp.py)
        rest = name[len("mtp."):]
        if rest in MTP_OWN:
            return [("mtp." + MTP_OWN[rest], read(name).float() + 1 if "norm" in rest else read(name))]
        m = re.fullmatch(r"layers\.0\.(.+)", rest)
        return [("mtp." + target, t) for target, t in _layer(f"model.layers.0.{m[1]}", name, read)] if m else []
    return _layer(name.replace("model.language_model.", "model.", 1), name, read)


def _layer(renamed: str, name: str, read: ReadTensor) -> Converted:
    """`renamed`: the checkpoint name as Qwen3_5MoeForCausalLM's; `name`: as stored."""
    target = _rename(renamed)
    if target is None:
        return []
    tensor = read(name)
    if OFFSET_NORM.fullmatch(target):
        return [(target, tensor.float() + 1)]
    if target.endswith("attn.conv"):
        return [(target, tensor.squeeze(1))]
    if target.endswith("experts.gate_up_proj"):
        prefix, size = target.removesuffix("gate_up_proj"), tensor.shape[1] // 2
        return [(f"{prefix}{e}.{m}", w) for e, t in enumerate(tensor)
                for m, w in (("gate", t[:size]), ("up", t[size:]))]
    if target.endswith("experts.down_proj"):
        prefix = target.removesuffix("down_proj")
        return [(f"{prefix}{e}.down", t) for e, t in enumerate(tensor)]
    return [(target, tensor)]
