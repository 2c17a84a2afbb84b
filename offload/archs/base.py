"""What every architecture adapter shares: config reading helpers and tensor renaming.

An adapter is two functions: `spec(config) -> ModelSpec` and `convert(name, reader)`, which maps
one checkpoint tensor to zero or more canonical tensors (see `ModelSpec.expected_shapes`).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from ..errors import ModelFormatError
from ..spec import AttentionSpec, RopeSpec

ReadTensor = Callable[[str], torch.Tensor]
Converted = Iterable[tuple[str, torch.Tensor]]

# Llama-style names shared by every supported architecture (layer-local part after `model.layers.N.`).
COMMON_LAYER_RENAMES: list[tuple[str, str]] = [
    (r"input_layernorm\.weight", "input_norm"),
    (r"post_attention_layernorm\.weight", "post_attn_norm"),
    (r"self_attn\.([qkvo])_proj\.weight", r"attn.\1"),
    (r"self_attn\.([qkvo])_proj\.bias", r"attn.\1_bias"),
    (r"self_attn\.([qk])_norm\.weight", r"attn.\1_norm"),
    (r"self_attn\.sinks", "attn.sinks"),
    (r"mlp\.(gate|up|down)_proj\.weight", r"mlp.\1"),
    (r"mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight", r"experts.\1.\2"),
    (r"mlp\.gate\.weight", "router.weight"),
    (r"mlp\.gate\.e_score_correction_bias", "router.correction_bias"),
]
TOP_LEVEL = {"model.embed_tokens.weight": "embed", "model.norm.weight": "norm", "lm_head.weight": "lm_head"}
LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")


def need(config: dict, key: str, *aliases: str):
    """A required config field (under its name or an alias transformers also writes), or a one-line error."""
    for name in (key, *aliases):
        if config.get(name) is not None:
            return config[name]
    raise ModelFormatError(
        f"config.json of model_type {config.get('model_type')!r} lacks {key!r}; the file is incomplete: "
        "re-export it with transformers' save_pretrained"
    )


def rope_params(config: dict, default_theta: float) -> dict:
    """rope_parameters in the transformers 5 form, also from the older rope_theta/rope_scaling fields."""
    params = config.get("rope_parameters")
    if params:
        return params
    scaling = dict(config.get("rope_scaling") or {})
    scaling.setdefault("rope_type", scaling.pop("type", "default"))
    scaling.setdefault("rope_theta", config.get("rope_theta", default_theta))
    return scaling


def rope_spec(params: dict, head_dim: int, default_partial: float = 1.0) -> RopeSpec:
    kind = params.get("rope_type", "default")
    if kind not in ("default", "yarn"):
        raise ModelFormatError(f"config.json rope_type {kind!r} is not supported (supported: default, yarn)")
    return RopeSpec(
        theta=float(params["rope_theta"]), head_dim=head_dim,
        partial_factor=float(params.get("partial_rotary_factor", default_partial)), kind=kind,
        factor=float(params.get("factor") or 1.0),
        original_max_positions=int(params.get("original_max_position_embeddings") or 0),
        beta_fast=float(params.get("beta_fast") or 32.0), beta_slow=float(params.get("beta_slow") or 1.0),
        truncate=bool(params.get("truncate", True)), attention_factor=params.get("attention_factor"),
        mscale=params.get("mscale"), mscale_all_dim=params.get("mscale_all_dim"),
    )


def head_dim_of(config: dict) -> int:
    return config.get("head_dim") or need(config, "hidden_size") // need(config, "num_attention_heads")


def plain_attention(config: dict, rope: RopeSpec, **overrides) -> AttentionSpec:
    """The Llama-style attention most architectures use; adapters override what differs."""
    heads = need(config, "num_attention_heads")
    hd = head_dim_of(config)
    fields = dict(num_heads=heads, num_kv_heads=config.get("num_key_value_heads") or heads, head_dim=hd,
                  v_head_dim=hd, rope=rope, qkv_bias=bool(config.get("attention_bias", False)),
                  o_bias=bool(config.get("attention_bias", False)))
    return AttentionSpec(**(fields | overrides))


def eos_ids(config: dict) -> tuple[int, ...]:
    eos = config.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (eos,)


def model_fields(config: dict, rms_norm_eps: float) -> dict:
    """The ModelSpec fields every architecture reads the same way."""
    return dict(model_type=config["model_type"], vocab_size=need(config, "vocab_size"),
                hidden_size=need(config, "hidden_size"), rms_norm_eps=config.get("rms_norm_eps", rms_norm_eps),
                tie_word_embeddings=config.get("tie_word_embeddings", False), bos_token_id=config.get("bos_token_id"),
                eos_token_ids=eos_ids(config), pad_token_id=config.get("pad_token_id"),
                max_position_embeddings=config.get("max_position_embeddings", 4096))


@dataclass
class Renamer:
    """Maps checkpoint names to canonical names with regexes on the layer-local suffix."""

    layer_renames: list[tuple[str, str]] = field(default_factory=lambda: list(COMMON_LAYER_RENAMES))
    top_level: dict[str, str] = field(default_factory=lambda: dict(TOP_LEVEL))

    def __post_init__(self) -> None:
        self._compiled = [(re.compile(p + "$"), r) for p, r in self.layer_renames]

    def __call__(self, name: str) -> str | None:
        if name in self.top_level:
            return self.top_level[name]
        m = LAYER.fullmatch(name)
        if not m:
            return None
        layer, rest = m.groups()
        for pattern, repl in self._compiled:
            if pattern.match(rest):
                return f"layers.{layer}." + pattern.sub(repl, rest)
        return None


def renaming_converter(renamer: Renamer) -> Callable[[str, ReadTensor], Converted]:
    def convert(name: str, read: ReadTensor) -> Converted:
        canonical = renamer(name)
        return [] if canonical is None else [(canonical, read(name))]
    return convert
