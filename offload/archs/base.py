"""What every architecture adapter shares: typed config readers, rope parameters, tensor renaming.

An adapter is a module with `model_type`, `spec(config) -> ModelSpec`, `convert(name, read)`, which maps one
checkpoint tensor to zero or more canonical tensors (see `ModelSpec.expected_shapes`), and `ignored`: regexes
of checkpoint tensors the runtime legitimately leaves unused (any other unused tensor is an error).

Every config field is read through `integer` / `number` / `flag` / `window` / `kinds`, which raise a
one-line ModelFormatError for a wrong type or value. Sizes are required (the checkpoint's shapes check them);
a behavioural field config.json leaves out takes the default of the architecture's transformers config class,
and an explicit null means what None means there, so both read the same file the same way.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ModelFormatError
from ..model.rope import inverse_frequencies
from ..spec import AttentionSpec, RopeSpec

ReadTensor = Callable[[str], torch.Tensor]
Converted = Iterable[tuple[str, torch.Tensor]]
REQUIRED: Any = object()

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
# Per-layer rotary caches of older checkpoints: recomputed from config.json, and ignored by transformers too.
ROTARY_CACHE = r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"
# Far above any released model: larger counts are corrupt, and would have the loader enumerate billions of tensors.
MAX_LAYERS, MAX_EXPERTS, MAX_HEAD_DIM = 1024, 16384, 65536


def bad(key: str, value, rule: str) -> ModelFormatError:
    """The one-line error for a config field that breaks a rule."""
    return ModelFormatError(f"config.json has {key}={value!r}, but it must be {rule}; correct config.json, or "
                            "re-export it with the checkpoint (transformers' save_pretrained)")


def _raw(config: dict, key: str, aliases: tuple[str, ...], default, null) -> tuple[str, Any, bool]:
    """(name, value, given). As in transformers, a field left out takes the class default and an explicit null
    means None, which is `null` where None means something (no window, no clipping) and an error elsewhere.
    Aliases are the names transformers' attribute_map also accepts; two of them must not disagree."""
    present = [name for name in (key, *aliases) if name in config]
    if len({json.dumps(config[name]) for name in present}) > 1:
        first, other = present[0], present[1]
        raise bad(other, config[other], f"equal to {first}={config[first]!r} (one field under two names)")
    for name in (key, *aliases):
        if name in config:
            if config[name] is not None:
                return name, config[name], True
            if null is REQUIRED:
                return name, None, True  # checked, and refused, as a value
            return name, null, False
    if default is REQUIRED:
        raise ModelFormatError(
            f"config.json of model_type {config.get('model_type')!r} lacks {key!r}; the file is incomplete: "
            "re-export it with transformers' save_pretrained")
    return key, default, False


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def integer(config: dict, key: str, *aliases: str, default=REQUIRED, null=REQUIRED, low: int = 1,
            high: int | None = None, label: str = "") -> int:
    """An integer field in [low, high] (a bool or 64.0 is not an integer); `label` prefixes its name in errors."""
    name, value, given = _raw(config, key, aliases, default, null)
    if given and (not _is_int(value) or value < low or (high is not None and value > high)):
        raise bad(label + name, value, f"an integer >= {low}" + (f" and <= {high}" if high is not None else ""))
    return value


def layer_count(config: dict) -> int:
    return integer(config, "num_hidden_layers", high=MAX_LAYERS)


def expert_count(config: dict, key: str, *aliases: str, low: int = 1) -> int:
    return integer(config, key, *aliases, low=low, high=MAX_EXPERTS)


def number(config: dict, key: str, *aliases: str, default=REQUIRED, null=REQUIRED, positive: bool = False,
           label: str = "") -> float:
    """A finite real field, > 0 when `positive`."""
    name, value, given = _raw(config, key, aliases, default, null)
    if not given:
        return value
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or (
            positive and value <= 0):
        raise bad(label + name, value, "a finite number > 0" if positive else "a finite number")
    return float(value)


def flag(config: dict, key: str, default: bool) -> bool:
    """A true/false field (null is refused, as transformers' type checks refuse it)."""
    name, value, _ = _raw(config, key, (), default, REQUIRED)
    if not isinstance(value, bool):
        raise bad(name, value, "true or false")
    return value


def silu_mlp(config: dict) -> None:
    """The gated MLPs (experts and dense layers) use hidden_act; only SiLU is implemented."""
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise bad("hidden_act", act, "'silu', the only activation this runtime implements for this architecture")


def window(config: dict, default: int | None, nullable: bool = True) -> int | None:
    """sliding_window: the number of keys a query sees, itself included (>= 1); null is no window where the
    architecture's layers all may be unwindowed (`nullable`), an error where some must have one."""
    return integer(config, "sliding_window", default=default, null=None if nullable else REQUIRED)


def kinds(config: dict, key: str, n: int, allowed: tuple[str, ...], default: list[str]) -> list[str]:
    """A per-layer list (layer_types, mlp_layer_types): exactly one allowed entry per hidden layer."""
    value = config.get(key)
    if value is None:
        return default
    if not isinstance(value, list) or len(value) != n:
        length = f"{len(value)} entries" if isinstance(value, list) else type(value).__name__
        raise bad(key, value, f"a list of one entry per layer (num_hidden_layers={n}), not {length}")
    if any(v not in allowed for v in value):
        raise bad(key, value, f"a list of {' / '.join(allowed)}")
    return value


def layer_set(config: dict, key: str, n: int) -> set[int]:
    """A list of layer indices (qwen3_moe's mlp_only_layers), each in [0, num_hidden_layers)."""
    value = config.get(key) or []
    if not isinstance(value, list) or not all(_is_int(i) and 0 <= i < n for i in value):
        raise bad(key, value, f"a list of layer indices in [0, num_hidden_layers={n})")
    return set(value)


def rope_params(config: dict, default_theta: float, default: dict | None = None) -> dict:
    """rope_parameters as transformers standardizes them: rope_scaling (older name) wins, then rope_parameters,
    then the architecture's default; rope_theta / partial_rotary_factor at top level fill what is unset."""
    params = config.get("rope_scaling") or config.get("rope_parameters")
    params = (default or {}) if params is None else params
    if not isinstance(params, dict):
        raise bad("rope_parameters", params, "an object")
    params = dict(params)
    params.setdefault("rope_type", params.get("type", "default"))
    params.setdefault("rope_theta", config.get("rope_theta", default_theta))
    if config.get("partial_rotary_factor") is not None:
        params.setdefault("partial_rotary_factor", config["partial_rotary_factor"])
    return params


def rope_spec(params: dict, head_dim: int, max_positions: int, default_partial: float | None = None,
              label: str = "") -> RopeSpec:
    """The rope of one layer kind (`label`: its key in a per-kind rope_parameters), every value checked; yarn's
    original_max_position_embeddings defaults to max_position_embeddings, as in transformers. Partial rotary
    only where the architecture's attention implements it (`default_partial` given): others rotate whole heads."""
    where = f"rope_parameters[{label!r}]" if label else "rope_parameters"
    if head_dim > MAX_HEAD_DIM:  # also bounds the rotary tables computed below
        raise bad("head_dim (or hidden_size / num_attention_heads)", head_dim, f"at most {MAX_HEAD_DIM}")
    if not isinstance(params, dict):
        raise bad(where, params, "an object")
    kind = params.get("rope_type", params.get("type", "default"))  # `type`: the older name
    if not isinstance(kind, str) or kind not in ("default", "yarn"):
        raise bad(f"{where}.rope_type", kind, "one of the supported kinds: default, yarn")

    def value(key: str, default=REQUIRED, positive: bool = True, null=REQUIRED):
        return number(params, key, default=default, null=null, positive=positive, label=where + ".")

    partial = value("partial_rotary_factor", default_partial if default_partial and kind == "default" else 1.0)
    if default_partial is None and partial != 1:
        raise bad(f"{where}.partial_rotary_factor", partial, "1 (this architecture rotates whole heads)")
    if partial > 1 or int(head_dim * partial) < 1:
        raise bad(f"{where}.partial_rotary_factor", partial,
                  f"in (0, 1], leaving at least one rotary channel of the head's {head_dim}")
    yarn = kind == "yarn"
    theta = value("rope_theta")
    if theta <= 1:
        raise bad(f"{where}.rope_theta", theta, "> 1")
    rope = RopeSpec(
        theta=theta, head_dim=head_dim, partial_factor=partial, kind=kind,
        factor=_at_least_one(value("factor"), f"{where}.factor") if yarn else 1.0,
        original_max_positions=integer(params, "original_max_position_embeddings", default=max_positions,
                                       label=where + ".") if yarn else 0,
        beta_fast=value("beta_fast", 32.0, null=32.0), beta_slow=value("beta_slow", 1.0, null=1.0),
        truncate=bool(params.get("truncate", True)), attention_factor=value("attention_factor", None, null=None),
        mscale=value("mscale", None, False, None), mscale_all_dim=value("mscale_all_dim", None, False, None),
    )
    try:  # extreme YaRN betas or factors overflow; YaRN needs an even rotary size, as in transformers
        inv_freq, scaling = inverse_frequencies(rope)
        finite = bool(torch.isfinite(inv_freq).all()) and math.isfinite(scaling)
    except (ArithmeticError, ValueError, RuntimeError):
        finite = False
    if not finite:
        raise bad(where, params, f"parameters that give finite rotary frequencies for head_dim={head_dim}")
    return rope


def _at_least_one(value: float, key: str) -> float:
    if value < 1:
        raise bad(key, value, ">= 1 (YaRN stretches the trained context)")
    return value


def head_dim_of(config: dict, default: int | None = None, nullable: bool = True) -> int:
    """head_dim, else the class default, else hidden_size / num_attention_heads; null means the latter only
    where transformers' model derives it (`nullable`)."""
    return (integer(config, "head_dim", default=default, null=None if nullable else REQUIRED)
            or integer(config, "hidden_size") // integer(config, "num_attention_heads"))


def plain_attention(config: dict, rope: RopeSpec, bias_default: bool = False, **overrides) -> AttentionSpec:
    """The Llama-style attention most architectures use; adapters override what differs."""
    heads, hd = integer(config, "num_attention_heads"), rope.head_dim
    bias = flag(config, "attention_bias", bias_default)
    kv_heads = integer(config, "num_key_value_heads", default=heads, null=heads)
    fields = dict(num_heads=heads, num_kv_heads=kv_heads, head_dim=hd, v_head_dim=hd, rope=rope, qkv_bias=bias,
                  o_bias=bias)
    return AttentionSpec(**(fields | overrides))


def token_ids(config: dict, key: str, default=None, many: bool = False) -> tuple[int, ...]:
    """A token id field (eos_token_id: also a list of them when `many`) or null; every id in the vocabulary."""
    value = config.get(key, default)
    ids = [] if value is None else value if many and isinstance(value, list) else [value]
    vocab = integer(config, "vocab_size")
    if not all(_is_int(i) and 0 <= i < vocab for i in ids):
        raise bad(key, value, f"a token id{' (or a list of them)' if many else ''} in [0, vocab_size={vocab})")
    return tuple(ids)


def model_fields(config: dict, defaults: dict) -> dict:
    """The ModelSpec fields every architecture reads the same way; `defaults`: its transformers config class's
    values of rms_norm_eps, max_position_embeddings and the special token ids."""
    def one(key: str) -> int | None:
        return next(iter(token_ids(config, key, defaults.get(key))), None)

    return dict(model_type=config["model_type"], vocab_size=integer(config, "vocab_size"),
                hidden_size=integer(config, "hidden_size"),
                rms_norm_eps=number(config, "rms_norm_eps", default=defaults["rms_norm_eps"], positive=True),
                tie_word_embeddings=flag(config, "tie_word_embeddings", False), bos_token_id=one("bos_token_id"),
                eos_token_ids=token_ids(config, "eos_token_id", defaults.get("eos_token_id"), many=True),
                pad_token_id=one("pad_token_id"),
                max_position_embeddings=integer(config, "max_position_embeddings",
                                                default=defaults["max_position_embeddings"]))


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


def mtp_converter(renamer: Renamer) -> Callable[[str, ReadTensor], Converted]:
    """renaming_converter, and the multi-token prediction layers' `model.mtp.*` tensors kept as read, as `mtp.*`
    (model/mtp.py names them when speculative decoding first needs them)."""
    plain = renaming_converter(renamer)

    def convert(name: str, read: ReadTensor) -> Converted:
        if name.startswith("model.mtp."):
            return [("mtp." + name[len("model.mtp."):], read(name))]
        return plain(name, read)
    return convert
