"""Fuzz target "config": config.json mutations (fields deleted, or set to other types and values, nested rope
parameters included) beside an undamaged tiny checkpoint of each architecture.

A case ends well when the load fails with a clean one-line error, or when it succeeds and the logits equal
those of transformers' model loaded from the same directory (the reference of every architecture). A load
that succeeds where transformers refuses the config, or reports weights missing, or computes other logits,
is a wrong answer."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from hypothesis import strategies as st

from .fuzz import Context, WrongAnswer, register

ARCHS = ("mixtral", "qwen3_moe", "olmoe", "gpt_oss", "mimo_v2_flash", "deepseek_v2", "deepseek_v3", "glm4_moe")
SIZES = dict(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             head_dim=8, intermediate_size=32, max_position_embeddings=64, bos_token_id=None, eos_token_id=None,
             pad_token_id=0, dtype="float32")
PER_ARCH = {"mixtral": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=5),
            "qwen3_moe": dict(moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1],
                              use_sliding_window=True, sliding_window=5),
            "olmoe": dict(num_experts=4, num_experts_per_tok=2, clip_qkv=3.0),
            "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=5),
            "mimo_v2_flash": dict(moe_intermediate_size=16, v_head_dim=8, num_key_value_heads=1, n_routed_experts=8,
                                  num_experts_per_tok=2, sliding_window=5),
            "deepseek_v2": dict(moe_intermediate_size=16, num_key_value_heads=4, head_dim=4, q_lora_rank=None,
                                kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=8,
                                num_experts_per_tok=2, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                first_k_dense_replace=1),
            "deepseek_v3": dict(moe_intermediate_size=16, num_key_value_heads=4, head_dim=4, q_lora_rank=8,
                                kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=8,
                                num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1),
            "glm4_moe": dict(moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                             topk_group=1, use_qk_norm=True, attention_bias=True)}
# Fields transformers reads that a saved config.json may not hold.
EXTRA_FIELDS = ("rope_scaling", "rope_theta", "partial_rotary_factor", "sliding_window_size", "layer_types",
                "mlp_layer_types", "use_sliding_window", "decoder_sparse_step", "mlp_only_layers", "norm_topk_prob",
                "n_group", "topk_group", "routed_scaling_factor", "attention_value_scale", "clip_qkv", "swiglu_limit",
                "swiglu_alpha", "attention_bias", "torch_dtype", "head_dim", "num_local_experts", "num_experts",
                "first_k_dense_replace", "n_shared_experts", "q_lora_rank", "rope_interleave", "topk_method",
                "use_qk_norm")
ROPE_FIELDS = ("rope_type", "rope_theta", "partial_rotary_factor", "factor", "original_max_position_embeddings",
               "beta_fast", "beta_slow", "truncate", "attention_factor", "type")
DELETE = "<delete>"
IDS = torch.randint(1, 64, (1, 12), generator=torch.Generator().manual_seed(0))
KINDS = ["full_attention", "sliding_attention", "dense", "sparse", "chunked_attention"]
VALUES = st.one_of(
    st.sampled_from([None, True, False, 0, 1, 2, 3, 4, 5, 8, -1, 0.5, 1.0, 1.5, 0.0, -1.0, 1e-6, 1e30, 2**31, "",
                     "4", "bfloat16", "float16", "int32", "yarn", "default", "full_attention", [], {}, [1], [7]]),
    st.integers(-2, 70), st.floats(-4.0, 1e7, allow_nan=False, allow_infinity=False),
    st.lists(st.sampled_from(KINDS), max_size=5),
    st.dictionaries(st.sampled_from(ROPE_FIELDS), st.sampled_from([None, 0, 1, 2.0, 0.5, 1e4, "yarn", "default"]),
                    max_size=3),
)


def _save(arch: str, path: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(arch, **(SIZES | PER_ARCH[arch]))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # off the init: no norm at 1, no bias or sink at 0
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * (0.3 if p.dim() == 1 else 0.05))
    model.save_pretrained(path)


def prepare(work: Path) -> Context:
    for arch in ARCHS:
        _save(arch, work / arch)
    pristine = {f"{arch}/config.json": (work / arch / "config.json").read_bytes() for arch in ARCHS}
    return Context(work, pristine, ("config.json", "model.safetensors", str(work)), {},
                   extra={"references": {}, "outcomes": {}})


def _paths(config: dict) -> list[tuple]:
    paths = [(key,) for key in sorted(set(config) | set(EXTRA_FIELDS))]
    rope = config.get("rope_parameters") or {}
    nested = [k for k, v in rope.items() if isinstance(v, dict)]
    paths += [("rope_parameters", *kind, key) for kind in ([(k,) for k in nested] or [()]) for key in ROPE_FIELDS]
    return paths


def cases(ctx: Context) -> st.SearchStrategy:
    def of(arch: str) -> st.SearchStrategy:
        paths = _paths(json.loads(ctx.pristine[f"{arch}/config.json"]))
        change = st.tuples(st.sampled_from(paths), st.just(DELETE) | VALUES)
        return st.tuples(st.just(arch), st.lists(change, min_size=1, max_size=3))
    return st.sampled_from(ARCHS).flatmap(of)


def mutated(config: dict, changes: list[tuple]) -> dict:
    config = json.loads(json.dumps(config))
    for path, value in changes:
        parent = config
        for key in path[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if not isinstance(parent, dict):
            continue
        if value == DELETE:
            parent.pop(path[-1], None)
        else:
            parent[path[-1]] = value
    return config


class _Reads(dict):
    """A config whose top-level keys record being looked at."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.keys_read: set[str] = set()

    def __getitem__(self, key):
        self.keys_read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.keys_read.add(key)
        return super().get(key, default)

    def __contains__(self, key) -> bool:
        self.keys_read.add(key)
        return super().__contains__(key)


def keys_read(config: dict) -> set[str]:
    """The config.json fields our adapter looks at for this config."""
    from ..archs import read_spec

    reads = _Reads(config)
    read_spec(reads)
    return reads.keys_read


def _hf_logits(config: dict, path: Path, dtype: torch.dtype, ids: torch.Tensor, cache: dict) -> torch.Tensor:
    """transformers' logits with this config.json and the checkpoint's weights (cached by the config it parsed).
    JSON integers in fields transformers types as float are passed as floats, as any lenient reader would."""
    from huggingface_hub.errors import StrictDataclassFieldValidationError
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    config = dict(config)
    while True:
        try:
            parsed = CONFIG_MAPPING[config["model_type"]].from_dict(config)
            break
        except StrictDataclassFieldValidationError as e:
            field = re.search(r"field '([^']+)'", str(e))
            if "expected float, got int" not in str(e) or field is None or field[1] not in config:
                raise
            config[field[1]] = float(config[field[1]])
    key = (parsed.to_json_string(), dtype, ids.shape[1])
    if key not in cache:
        model, info = AutoModelForCausalLM.from_pretrained(path, config=parsed, dtype=dtype, output_loading_info=True)
        lost = info["missing_keys"] or info["mismatched_keys"]
        if lost:
            raise WrongAnswer(f"loaded, but transformers' model lacks {sorted(lost)[:3]}")
        with torch.no_grad():
            cache[key] = model.eval()(ids).logits.float()
    return cache[key]


def _reference(ctx: Context, arch: str, config: dict, dtype: torch.dtype, ids: torch.Tensor) -> torch.Tensor:
    """transformers' logits for the mutated config. Where transformers refuses it, the mutated fields our adapter
    never looks at are restored (they cannot change our output): a refusal that remains is of what we read."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    path = ctx.path / arch
    pristine = json.loads(ctx.pristine[f"{arch}/config.json"])
    unread = {k for k in set(config) | set(pristine)  # JSON-compared: 0 == False, but not to transformers
              if json.dumps(config.get(k, DELETE)) != json.dumps(pristine.get(k, DELETE))}
    unread -= keys_read(config)
    try:
        try:
            return _hf_logits(config, path, dtype, ids, ctx.extra["references"])
        except Exception:
            if not unread:
                raise
            restored = {k: v for k, v in config.items() if k not in unread} | {k: pristine[k] for k in unread
                                                                              if k in pristine}
            (path / "config.json").write_text(json.dumps(restored))
            return _hf_logits(restored, path, dtype, ids, ctx.extra["references"])
    except WrongAnswer:
        raise
    except Exception as e:  # noqa: BLE001 - any refusal of transformers' counts
        raise WrongAnswer(f"loaded a config transformers refuses ({type(e).__name__}: {str(e)[:200]})") from None


def run(ctx: Context, case) -> None:
    import offload

    arch, changes = case
    config = mutated(json.loads(ctx.pristine[f"{arch}/config.json"]), changes)
    (ctx.path / arch / "config.json").write_text(json.dumps(config))
    outcomes = ctx.extra["outcomes"]
    try:
        model = offload.load(ctx.path / arch, device="cpu")
    except Exception:
        outcomes["refused"] = outcomes.get("refused", 0) + 1
        raise
    ids = IDS[:, :model.spec.max_position_embeddings]  # a longer prompt is refused, as it should be
    got = model.forward(ids)
    expected = _reference(ctx, arch, config, model.decoder.dtype, ids)
    tolerance = 1e-4 if model.decoder.dtype == torch.float32 else 0.1  # 16-bit: rounding, not semantics
    if not torch.isfinite(got).all() or (got - expected).abs().max() > tolerance * expected.abs().max():
        raise WrongAnswer(f"logits differ from transformers' by {(got - expected).abs().max():.3g}")
    outcomes["loaded"] = outcomes.get("loaded", 0) + 1


register("config", prepare, cases, run)
