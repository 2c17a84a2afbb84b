"""Tiny random transformers checkpoints for every supported architecture, with every weight perturbed
(no norm is identity, no bias/sink/correction bias is zero), saved with save_pretrained."""
from __future__ import annotations

from pathlib import Path

import torch

ARCHS: dict[str, dict] = {
    "mixtral": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, sliding_window=12),
    "qwen3_moe": dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=48, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=6,
                      num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[1], use_sliding_window=True,
                      sliding_window=12),
    "olmoe": dict(hidden_size=64, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, num_experts=6, num_experts_per_tok=2, clip_qkv=3.0),
    "gpt_oss": dict(hidden_size=64, intermediate_size=64, head_dim=16, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, sliding_window=8),
    "mimo_v2_flash": dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=6,
                          num_attention_heads=4, num_key_value_heads=1, head_dim=24, v_head_dim=16,
                          n_routed_experts=8, num_experts_per_tok=2, sliding_window=8),
    # layers: 3 Gated DeltaNet + 1 gated full attention; odd vocabulary; value heads share key heads (4 to 2)
    "qwen3_5_moe": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                        linear_value_head_dim=24, linear_conv_kernel_dim=4, moe_intermediate_size=32,
                        shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2, vocab_size=257),
    "glm4_moe": dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, n_routed_experts=8,
                     num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=1,
                     routed_scaling_factor=2.5, use_qk_norm=True, attention_bias=True),
    # MLA: decode (a few tokens) takes the absorbed path, a 40-token prefill the expanded one (model/mla.py)
    "deepseek_v3": dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=32, qk_rope_head_dim=8,
                        qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                        topk_group=1, n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5,
                        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, mscale=1.0,
                                             mscale_all_dim=0.707, original_max_position_embeddings=128)),
    "deepseek_v2": dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
                        num_attention_heads=4, q_lora_rank=None, kv_lora_rank=32, qk_rope_head_dim=8,
                        qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2,
                        topk_method="group_limited_greedy", n_group=4, topk_group=2, n_shared_experts=2,
                        first_k_dense_replace=1, routed_scaling_factor=1.5),
}
# transformers' model_type where it differs from ours: Qwen3.5-MoE's text model (the multimodal config nests it)
HF_TYPES = {"qwen3_5_moe": "qwen3_5_moe_text"}
# save_pretrained(max_shard_size=...) sizes at which some layer's experts have down_proj in an earlier shard than
# gate/up and another layer's do not; the other architectures' shards always hold down_proj first.
SHARD_SIZES = {"gpt_oss": "220KB", "mixtral": "300KB"}
COMMON = dict(vocab_size=256, max_position_embeddings=512, bos_token_id=None, eos_token_id=None, pad_token_id=0)


def hf_config(arch: str, **overrides):
    from transformers import AutoConfig

    return AutoConfig.for_model(HF_TYPES.get(arch, arch), **(COMMON | ARCHS[arch] | overrides))


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Move every parameter and float buffer off its init (norms off 1, biases/sinks off 0)."""
    g = torch.Generator().manual_seed(seed)
    tensors = list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers()
                                                if b.is_floating_point() and "inv_freq" not in n]
    for _, t in tensors:
        scale = 0.3 if t.dim() == 1 else 0.05
        t.add_(torch.randn(t.shape, generator=g) * scale)


def make_hf_model(arch: str, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = hf_config(arch, **overrides)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    perturb(model, seed)
    return model


def save_tiny(arch: str, directory: Path, seed: int = 0, **overrides):
    """Save a perturbed tiny model and return the transformers model (the reference)."""
    model = make_hf_model(arch, seed, **overrides)
    model.save_pretrained(directory)
    return model
