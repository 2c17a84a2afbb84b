"""gpt-oss: alternating sliding/full attention with sinks everywhere, biased router (top-k on logits, then
softmax), fused experts with interleaved gate/up and the clamped SwiGLU, YaRN rope, MXFP4 experts.

Checkpoint experts are fused per layer: `gate_up_proj` [E, H, 2I] (gate = even columns, up = odd) and
`down_proj` [E, I, H]; in MXFP4 checkpoints `*_blocks` [E, rows, cols/32, 16] + `*_scales` [E, rows, cols/32]
in [out, in] row order. Both are split here into per-expert [out, in] tensors.
"""
import re

import torch

from offload.quant import from_mxfp4

from ..spec import ExpertSpec, LayerSpec, ModelSpec, RouterSpec
from .base import (
    COMMON_LAYER_RENAMES,
    LAYER,
    ROTARY_CACHE,
    Converted,
    ReadTensor,
    Renamer,
    expert_count,
    head_dim_of,
    integer,
    kinds,
    layer_count,
    model_fields,
    number,
    plain_attention,
    rope_params,
    rope_spec,
    window,
)

model_type = "gpt_oss"


# GptOssConfig's defaults: a 128-token window, YaRN, biased attention projections
DEFAULTS = dict(rms_norm_eps=1e-5, max_position_embeddings=131072)
DEFAULT_ROPE = dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                    original_max_position_embeddings=4096)
ignored = (ROTARY_CACHE,)


def spec(config: dict) -> ModelSpec:
    fields = model_fields(config, DEFAULTS)
    rope = rope_spec(rope_params(config, 150000.0, DEFAULT_ROPE), head_dim_of(config, 64, nullable=False),
                     fields["max_position_embeddings"])
    n = layer_count(config)
    layer_types = kinds(config, "layer_types", n, ("sliding_attention", "full_attention"),
                        ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)])
    sliding = window(config, 128, nullable=False)
    attn = {kind: plain_attention(config, rope, bias_default=True, sinks=True,
                                  window=sliding if kind == "sliding_attention" else None)
            for kind in set(layer_types)}
    return ModelSpec(
        **fields,
        layers=tuple(LayerSpec(attn[kind], "moe") for kind in layer_types),
        router=RouterSpec(expert_count(config, "num_local_experts", "num_experts"),
                          integer(config, "num_experts_per_tok", low=0),
                          "softmax_topk_first", False, bias=True),
        expert=ExpertSpec(integer(config, "intermediate_size"), "swiglu_clamp", bias=True,
                          alpha=number(config, "swiglu_alpha", default=1.702),
                          limit=number(config, "swiglu_limit", default=7.0, positive=True)),
    )


_rename = Renamer([(r"mlp\.router\.weight", "router.weight"), (r"mlp\.router\.bias", "router.bias"),
                   *COMMON_LAYER_RENAMES])
_FUSED = re.compile(r"mlp\.experts\.(gate_up_proj|down_proj)(_bias|_blocks|_scales)?")


def _split_rows(prefix: str, proj: str, rows: torch.Tensor, suffix: str) -> Converted:
    """rows: [E, out, ...] in [out, in] order; gate/up interleave along `out`."""
    for e in range(rows.shape[0]):
        if proj == "gate_up_proj":
            yield f"{prefix}experts.{e}.gate{suffix}", rows[e, 0::2].contiguous()
            yield f"{prefix}experts.{e}.up{suffix}", rows[e, 1::2].contiguous()
        else:
            yield f"{prefix}experts.{e}.down{suffix}", rows[e].contiguous()


def _split_mxfp4(prefix: str, proj: str, blocks: torch.Tensor, scales: torch.Tensor) -> Converted:
    rows = {"gate": slice(0, None, 2), "up": slice(1, None, 2)} if proj == "gate_up_proj" else {"down": slice(None)}
    for e in range(blocks.shape[0]):
        for role, r in rows.items():
            name = f"{prefix}experts.{e}.{role}"
            yield name, from_mxfp4(blocks[e, r].contiguous(), scales[e, r].contiguous(), name=name)


def convert(name: str, read: ReadTensor) -> Converted:
    m = LAYER.fullmatch(name)
    fused = _FUSED.fullmatch(m.group(2)) if m else None
    if fused is None:
        canonical = _rename(name)
        return [] if canonical is None else [(canonical, read(name))]
    prefix, (proj, kind) = f"layers.{m.group(1)}.", fused.groups()
    if kind == "_scales":  # consumed together with its _blocks tensor
        return []
    if kind == "_bias":
        return _split_rows(prefix, proj, read(name), "_bias")
    if kind == "_blocks":  # kept in MXFP4; the loader dequantizes when no quantization preset is asked for
        return _split_mxfp4(prefix, proj, read(name), read(name[: -len("_blocks")] + "_scales"))
    return _split_rows(prefix, proj, read(name).transpose(1, 2), "")  # dense [E, in, out] -> [E, out, in]
