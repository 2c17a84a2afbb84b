"""config.json and the checkpoint must agree, and config.json must follow its architecture's rules: every
disagreement is a one-line ModelFormatError / CheckpointError at load (never a wrong answer, never an error
at the first generate); every checkpoint tensor is used or explicitly known as ignorable by its architecture."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hf_tiny import save_tiny
from safetensors.torch import load_file, save_file
from one_line import raises_one_line

import offload
from offload import CheckpointError, ModelFormatError

IDS = torch.randint(1, 256, (1, 24), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """arch -> (tiny checkpoint dir, transformers reference), saved once per architecture."""
    made = {}

    def get(arch: str):
        if arch not in made:
            directory = tmp_path_factory.mktemp(f"base_{arch}")
            made[arch] = directory, save_tiny(arch, directory)
        return made[arch]
    return get


def _variant(base, arch: str, tmp_path: Path, config: dict | None = None, drop: tuple[str, ...] = (),
             tensors=None) -> Path:
    """A copy of the arch's tiny checkpoint with config.json fields set (`config`) or dropped, and the
    state dict edited by `tensors(sd)`."""
    src, _ = base(arch)
    path = tmp_path / arch
    shutil.copytree(src, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg |= config or {}
    for key in drop:
        cfg.pop(key, None)
    (path / "config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        sd = load_file(path / "model.safetensors")
        tensors(sd)
        save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    return path


def _rejects(path: Path, exc_type: type, *parts: str) -> str:
    return raises_one_line(lambda: offload.load(path), exc_type, *parts)


def _matches_reference(path: Path, ref) -> None:
    with torch.no_grad():
        expected = ref(IDS).logits
    got = offload.load(path).forward(IDS)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


# --- tensors config.json does not account for ---------------------------------------------------------------

@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss", "mimo_v2_flash", "deepseek_v2", "deepseek_v3", "glm4_moe", "qwen3_5_moe"])
def test_fewer_layers_in_config_than_in_checkpoint(base, tmp_path, arch):
    """DeepSeek-V3 and GLM-4.5 read layers past num_hidden_layers as MTP layers, but only ones that are (eh_proj)."""
    n = json.loads((base(arch)[0] / "config.json").read_text())["num_hidden_layers"]
    extra = {"layer_types": None, "mlp_layer_types": None} if arch != "mixtral" else {}
    path = _variant(base, arch, tmp_path, {"num_hidden_layers": n - 1} | extra)
    message = _rejects(path, CheckpointError, f"model.layers.{n - 1}.", "config.json")
    assert "re-export" in message


def test_unknown_tensor_is_listed(base, tmp_path):
    path = _variant(base, "olmoe", tmp_path,
                    tensors=lambda sd: sd.update({"model.layers.0.mlp.shared_expert.weight": torch.ones(4, 64),
                                                  "model.extra_head.weight": torch.ones(2)}))
    _rejects(path, CheckpointError, "2 tensor(s)", "model.extra_head.weight", "model.layers.0.mlp.shared_expert.weight")


def test_biases_config_says_absent(base, tmp_path):
    """attention_bias false, but the checkpoint has q/k/v biases: they would be dropped silently."""
    path = _variant(base, "qwen3_moe", tmp_path,
                    tensors=lambda sd: sd.update({f"model.layers.0.self_attn.{p}_proj.bias": torch.ones(n)
                                                  for p, n in (("q", 64), ("k", 32), ("v", 32))}))
    _rejects(path, CheckpointError, "model.layers.0.self_attn.q_proj.bias")


def test_tied_embeddings_but_checkpoint_has_lm_head(base, tmp_path):
    path = _variant(base, "mixtral", tmp_path, {"tie_word_embeddings": True})
    _rejects(path, CheckpointError, "lm_head.weight")


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "olmoe", "gpt_oss", "mimo_v2_flash", "qwen3_5_moe"])
def test_rotary_inv_freq_caches_are_ignored(base, tmp_path, arch):
    """Old checkpoints store rotary_emb.inv_freq per layer; transformers ignores them, so do we."""
    path = _variant(base, arch, tmp_path, tensors=lambda sd: sd.update(
        {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.ones(8) for i in range(2)}))
    _matches_reference(path, base(arch)[1])


# --- per-layer lists -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,key,value", [
    ("gpt_oss", "layer_types", ["sliding_attention", "full_attention", "sliding_attention"]),
    ("gpt_oss", "layer_types", ["sliding_attention", "full_attention"] * 3),
    ("mimo_v2_flash", "layer_types", ["full_attention"] + ["sliding_attention"] * 4),
    ("mimo_v2_flash", "mlp_layer_types", ["dense"] + ["sparse"] * 6),
    ("mimo_v2_flash", "mlp_layer_types", ["dense"] + ["sparse"] * 4),
])
def test_layer_list_of_wrong_length(base, tmp_path, arch, key, value):
    n = json.loads((base(arch)[0] / "config.json").read_text())["num_hidden_layers"]
    _rejects(_variant(base, arch, tmp_path, {key: value}), ModelFormatError, key, str(len(value)), str(n))


@pytest.mark.parametrize("arch,key,value", [
    ("gpt_oss", "layer_types", ["sliding_attention", "chunked_attention", "sliding_attention", "full_attention"]),
    ("mimo_v2_flash", "mlp_layer_types", ["dense", "moe", "sparse", "sparse", "sparse", "sparse"]),
    ("mimo_v2_flash", "layer_types", "full_attention"),
    ("qwen3_moe", "mlp_only_layers", [7]),
    ("qwen3_moe", "mlp_only_layers", ["1"]),
])
def test_layer_list_with_unknown_entry(base, tmp_path, arch, key, value):
    _rejects(_variant(base, arch, tmp_path, {key: value}), ModelFormatError, key)


# --- field values the architecture does not allow --------------------------------------------------------------

@pytest.mark.parametrize("arch,config,field", [
    ("mixtral", {"sliding_window": 0}, "sliding_window"),
    ("gpt_oss", {"sliding_window": 0}, "sliding_window"),
    ("mimo_v2_flash", {"sliding_window": -4}, "sliding_window"),
    ("qwen3_moe", {"sliding_window": 0}, "sliding_window"),  # use_sliding_window is true in the tiny config
    ("mixtral", {"sliding_window": 8.5}, "sliding_window"),
    ("mixtral", {"num_experts_per_tok": 5}, "num_experts_per_tok"),
    ("olmoe", {"num_experts_per_tok": 0}, "num_experts_per_tok"),
    ("gpt_oss", {"num_experts_per_tok": 9}, "num_experts_per_tok"),
    ("mimo_v2_flash", {"num_experts_per_tok": 9}, "num_experts_per_tok"),
    ("mimo_v2_flash", {"n_group": 3}, "n_group"),
    ("mimo_v2_flash", {"n_group": 0}, "n_group"),
    ("mimo_v2_flash", {"n_group": 8}, "n_group"),  # one expert per group: grouped top-k needs two
    ("mimo_v2_flash", {"n_group": 2, "topk_group": 3}, "topk_group"),
    ("mimo_v2_flash", {"n_group": 4, "topk_group": 1, "num_experts_per_tok": 3}, "topk_group"),
    ("mixtral", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 1.5}},
     "partial_rotary_factor"),
    ("mixtral", {"rope_parameters": {"rope_type": "default", "rope_theta": 0}}, "rope_theta"),
    ("olmoe", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor"),  # only MiMo's attention rotates part of a head
    ("gpt_oss", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 0.5}}, "factor"),
    ("gpt_oss", {"sliding_window": None}, "sliding_window"),  # its sliding layers need one
    ("gpt_oss", {"head_dim": None}, "head_dim"),
    ("gpt_oss", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 32.0, "beta_fast": 2e-311,
                                     "original_max_position_embeddings": 64}}, "rope_parameters"),
    ("mimo_v2_flash", {"rope_scaling": None}, "rope_parameters"),  # transformers: rope_scaling replaces it
    ("mimo_v2_flash", {"rope_parameters": {}}, "rope_parameters"),
    ("gpt_oss", {"head_dim": 19}, "head_dim=19"),  # YaRN needs an even rotary size
    ("qwen3_moe", {"head_dim": 2**31}, "head_dim"),  # once allocated a 2**30-entry rotary table
    ("mimo_v2_flash", {"hidden_act": "gelu"}, "hidden_act"),
    ("deepseek_v3", {"head_dim": 16}, "head_dim"),  # transformers would rotate 16 channels of the 8-channel key
    ("deepseek_v3", {"num_key_value_heads": 2}, "num_key_value_heads"),
    ("deepseek_v3", {"n_group": 3}, "n_group"),
    ("deepseek_v2", {"topk_method": "noaux_tc"}, "topk_method"),
    ("deepseek_v2", {"n_group": 3}, "n_group"),
    ("glm4_moe", {"first_k_dense_replace": -1}, "first_k_dense_replace"),
    ("mixtral", {"num_local_experts": 4, "num_experts": 8}, "num_experts"),
    ("olmoe", {"rms_norm_eps": 0}, "rms_norm_eps"),
    ("olmoe", {"rms_norm_eps": "1e-5"}, "rms_norm_eps"),
    ("olmoe", {"num_attention_heads": "4"}, "num_attention_heads"),
    ("olmoe", {"hidden_size": 64.5}, "hidden_size"),
    ("olmoe", {"num_hidden_layers": 0}, "num_hidden_layers"),
    ("olmoe", {"num_key_value_heads": 3}, "num_key_value_heads"),
    ("olmoe", {"max_position_embeddings": 0}, "max_position_embeddings"),
    ("olmoe", {"clip_qkv": -1.0}, "clip_qkv"),
    ("mixtral", {"eos_token_id": 256}, "eos_token_id"),
    ("mixtral", {"eos_token_id": "2"}, "eos_token_id"),
    ("mixtral", {"pad_token_id": -1}, "pad_token_id"),
    ("qwen3_moe", {"decoder_sparse_step": 0}, "decoder_sparse_step"),
    ("gpt_oss", {"swiglu_limit": 0}, "swiglu_limit"),
    ("mixtral", {"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
])
def test_field_value_rejected_at_load(base, tmp_path, arch, config, field):
    _rejects(_variant(base, arch, tmp_path, config), ModelFormatError, "config.json", field)


@pytest.mark.parametrize("factor", [1.5, 0.0])
def test_mimo_partial_rotary_factor_out_of_range(base, tmp_path, factor):
    cfg = json.loads((base("mimo_v2_flash")[0] / "config.json").read_text())
    rope = cfg["rope_parameters"]
    rope["sliding_attention"] = rope["sliding_attention"] | {"partial_rotary_factor": factor}
    _rejects(_variant(base, "mimo_v2_flash", tmp_path, {"rope_parameters": rope}), ModelFormatError,
             "partial_rotary_factor", "sliding_attention")


@pytest.mark.parametrize("dtype", ["int32", "bool", "uint8", 5, "float8_e4m3fn"])
def test_non_float_torch_dtype(base, tmp_path, dtype):
    path = _variant(base, "mixtral", tmp_path, {"torch_dtype": dtype}, drop=("dtype",))
    _rejects(path, ModelFormatError, "config.json", "dtype", repr(dtype))


# --- defaults and spellings must be transformers' -----------------------------------------------------------

@pytest.mark.parametrize("arch,drop", [("gpt_oss", ("sliding_window",)), ("mimo_v2_flash", ("sliding_window",)),
                                       ("mimo_v2_flash", ("attention_value_scale",))])
def test_absent_field_means_transformers_default(base, tmp_path, arch, drop):
    """A field config.json leaves out takes transformers' default (e.g. gpt-oss's 128-token window), not ours."""
    from transformers import AutoModelForCausalLM

    path = _variant(base, arch, tmp_path, drop=drop)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(1, 256, (1, 200), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = ref(ids).logits
    got = offload.load(path).forward(ids)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_mimo_sliding_window_size_is_window_minus_one(base, tmp_path):
    """MiMo's own configs give sliding_window_size (keys before the query); transformers reads it as size + 1."""
    from transformers import AutoModelForCausalLM

    path = _variant(base, "mimo_v2_flash", tmp_path, {"sliding_window_size": 5})
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert ref.config.sliding_window == 6
    with torch.no_grad():
        expected = ref(IDS).logits
    got = offload.load(path).forward(IDS)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


# --- real-size configs: every tensor transformers' model has is accounted for ----------------------------------

@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "olmoe", "gpt_oss", "mimo_v2_flash", "qwen3_5_moe"])
def test_transformers_default_config_accounts_for_every_tensor(arch):
    """transformers' default config of each class is the released model's: its full-size state dict (built on the
    meta device) maps onto exactly the tensors our spec expects, with their shapes, and nothing is left over."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion

    from offload.archs import adapter_for
    from offload.loader import converted

    config = AutoConfig.for_model(arch).to_dict()
    adapter = adapter_for(config)
    spec = adapter.spec(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch))
    state = revert_weight_conversion(model, model.state_dict())  # the names save_pretrained writes
    stream = [(Path("model.safetensors"), name) for name in state]
    got = {canonical: tuple(t.shape) for _, _, canonical, t in converted(stream, state.__getitem__, spec, adapter)}
    assert got == spec.expected_shapes()


@pytest.mark.parametrize("content", ["[]", "{", '{"eos_token_id": "2"}', '{"eos_token_id": [1, 300]}',
                                     '{"eos_token_id": true}'])
def test_broken_generation_config(base, tmp_path, content):
    """generate() reads its EOS ids there first: a broken file is refused at load, not at the first generate."""
    path = _variant(base, "mixtral", tmp_path)
    (path / "generation_config.json").write_text(content)
    _rejects(path, ModelFormatError, "generation_config.json")
