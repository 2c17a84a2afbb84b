"""Multi-head Latent Attention (DeepSeek-V2/V3): the config variants the generic tests' tiny models leave out,
against transformers; the cache holds latents and rotary keys, and its size for DeepSeek-V3's dimensions."""
import json

import pytest
import torch
from hf_tiny import save_tiny

import offload
from offload.archs import read_spec
from offload.engine.planner import kv_bytes
from offload.model.mla import absorbs

VARIANTS = {
    "v3-no-q-lora-halves-rope-biases": ("deepseek_v3", dict(q_lora_rank=None, rope_interleave=False,
                                                            attention_bias=True, rope_parameters=None)),
    "v3-yarn-equal-mscales": ("deepseek_v3", dict(rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=8.0, mscale=0.707, mscale_all_dim=0.707,
        original_max_position_embeddings=64))),
    "v2-q-lora-greedy-yarn": ("deepseek_v2", dict(q_lora_rank=24, topk_method="greedy", n_group=None,
                                                  topk_group=None, rope_parameters=dict(
                                                      rope_type="yarn", rope_theta=10000.0, factor=4.0, mscale=1.0,
                                                      mscale_all_dim=1.0, original_max_position_embeddings=128))),
}
# DeepSeek-V3's config.json, the fields MLA's cache depends on
V3 = dict(model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, num_hidden_layers=61, num_attention_heads=128,
          num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128,
          v_head_dim=128, intermediate_size=18432, moe_intermediate_size=2048, n_routed_experts=256,
          num_experts_per_tok=8, first_k_dense_replace=3, rope_scaling=dict(
              type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1, mscale=1.0,
              mscale_all_dim=1.0), max_position_embeddings=163840)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_matches_transformers(tmp_path, variant):
    arch, overrides = VARIANTS[variant]
    ref = save_tiny(arch, tmp_path, **overrides)
    model = offload.load(tmp_path)
    ids = torch.randint(1, 256, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ref(ids).logits
    assert (model.forward(ids) - expected).abs().max() <= 1e-4 * expected.abs().max(), variant
    prompt = ids[:1, :10]
    assert model.generate(prompt, max_new_tokens=16).tolist() == ref.generate(
        prompt, max_new_tokens=16, do_sample=False, min_new_tokens=16).tolist(), variant


@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
def test_cache_holds_latents_and_rotary_keys(tmp_path, arch):
    save_tiny(arch, tmp_path)
    path = tmp_path
    model = offload.load(path)
    config = json.loads((path / "config.json").read_text())
    cache = model.decoder.new_cache(2, 16)
    ids = torch.randint(1, 256, (2, 16), generator=torch.Generator().manual_seed(4))
    model.decoder.hidden_states(ids, cache, torch.arange(16).expand(2, 16), torch.ones(2, 16, dtype=torch.bool))
    for layer in cache.layers:
        assert layer.k.shape == (2, 1, 16, config["kv_lora_rank"])
        assert layer.v.shape == (2, 1, 16, config["qk_rope_head_dim"])
        assert layer.k.abs().sum() > 0 and layer.v.abs().sum() > 0


def test_kimi_k2_config_reads_as_deepseek_v3():
    """Kimi-K2 publishes DeepSeek-V3's architecture under model_type kimi_k2 (64 heads, 384 experts, one group)."""
    kimi = V3 | dict(model_type="kimi_k2", num_attention_heads=64, num_key_value_heads=64, n_routed_experts=384,
                     n_group=1, topk_group=1, routed_scaling_factor=2.827)
    adapter, spec = read_spec(kimi)
    assert adapter.model_type == "deepseek_v3" and spec.router.num_experts == 384 and spec.router.n_group == 1
    assert kv_bytes(spec, 1, 2) == 61 * 576 * 2


def test_v3_cache_bytes_per_token():
    """576 values (512 latent + 64 rotary key) per layer and position instead of 128 x (192 + 128): 1/71."""
    _, spec = read_spec(V3)
    assert kv_bytes(spec, 1, 2) == 61 * (512 + 64) * 2 == 70_272
    expanded = 61 * 128 * (192 + 128) * 2
    assert expanded == 4_997_120
    a = spec.layers[0].attention
    assert absorbs(a, 1) and absorbs(a, 64) and not absorbs(a, 512)  # decode and drafts absorb; long prefills expand
