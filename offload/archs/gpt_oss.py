"""gpt-oss: alternating sliding/full attention with sinks everywhere, biased router (top-k on logits, then
softmax), fused experts with interleaved gate/up and the clamped SwiGLU, YaRN rope, MXFP4 experts.

Checkpoint experts are fused per layer: `gate_up_proj` [E, H, 2I] (gate = even columns, up = odd) and
`down_proj` [E, I, H]; in MXFP4 checkpoints `*_blocks` [E, rows, cols/32, 16] + `*_scales` [E, rows, cols/32]
in [out, in] row order. Both are split here into per-expert [out, in] tensors.
"""
import re

import torch

from ..spec import ExpertSpec, LayerSpec, ModelSpec, RouterSpec
from .base import (COMMON_LAYER_RENAMES, LAYER, Converted, ReadTensor, Renamer, eos_ids, head_dim_of, need,
                   plain_attention, rope_params, rope_spec)

model_type = "gpt_oss"


def spec(config: dict) -> ModelSpec:
    rope = rope_spec(rope_params(config, 150000.0), head_dim_of(config))
    n = need(config, "num_hidden_layers")
    layer_types = config.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention"
                                                for i in range(n)]
    attn = {kind: plain_attention(config, rope, sinks=True,
                                  window=config.get("sliding_window") if kind == "sliding_attention" else None)
            for kind in set(layer_types)}
    return ModelSpec(
        model_type=model_type, vocab_size=need(config, "vocab_size"), hidden_size=need(config, "hidden_size"),
        rms_norm_eps=config.get("rms_norm_eps", 1e-5),
        layers=tuple(LayerSpec(attn[kind], "moe") for kind in layer_types),
        router=RouterSpec(need(config, "num_local_experts"), need(config, "num_experts_per_tok"),
                          "softmax_topk_first", False, bias=True),
        expert=ExpertSpec(need(config, "intermediate_size"), "swiglu_clamp", bias=True,
                          alpha=config.get("swiglu_alpha", 1.702), limit=config.get("swiglu_limit", 7.0)),
        tie_word_embeddings=config.get("tie_word_embeddings", False), bos_token_id=config.get("bos_token_id"),
        eos_token_ids=eos_ids(config), pad_token_id=config.get("pad_token_id"),
        max_position_embeddings=config.get("max_position_embeddings", 4096),
    )


FP4_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """[..., rows, cols/32, 16] uint8 (low nibble = even element) + E8M0 scales -> fp32 [..., rows, cols]."""
    lut = FP4_E2M1.to(blocks.device)
    values = torch.stack([lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]], dim=-1).flatten(-2)
    values = torch.ldexp(values, scales.to(torch.int32)[..., None] - 127)
    return values.flatten(-2)


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
    if kind == "_blocks":
        rows = dequantize_mxfp4(read(name), read(name[: -len("_blocks")] + "_scales"))
        return _split_rows(prefix, proj, rows, "")
    return _split_rows(prefix, proj, read(name).transpose(1, 2), "")  # dense [E, in, out] -> [E, out, in]
