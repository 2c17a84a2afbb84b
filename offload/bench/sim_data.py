"""Data of `offload-bench simulate`, each item with its source: GPUs and hosts, model configs, and the offloading
paper's published decode speeds (the figures the simulator is validated on)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float  # what a process can allocate
    memory_gbps: float  # peak DRAM bandwidth
    link_gbps: float  # nominal host->device PCIe bandwidth (generation x lanes)
    host_gbps: float  # rate the host's CPU cores read expert weights through our native kernels (assumed)
    source: str


# Spec-sheet figures (NVIDIA datasheets). host_gbps is an assumption until measured on each machine: our fused CPU
# kernel reads 4-bit tiles at ~87% of streaming read (BENCHMARKS.md, AVX-512, 2 threads); Colab gives 2 vCPUs
# (~15 GB/s streaming assumed), a desktop with dual-channel DDR4/DDR5 ~30/50 GB/s.
GPUS = {
    "T4": GPU("Tesla T4 (Colab)", 15.0, 320, 15.75, 13, "T4 datasheet; PCIe 3.0 x16; Colab: 2 vCPUs"),
    "RTX3060": GPU("RTX 3060 12 GB", 12.0, 360, 31.5, 26, "RTX 3060 spec; PCIe 4.0 x16; desktop DDR4"),
    "A100": GPU("A100 80 GB", 80.0, 1935, 31.5, 40, "A100 PCIe 80 GB datasheet; PCIe 4.0 x16; server host"),
    "RTX3080M": GPU("RTX 3080 Mobile 16 GB", 16.0, 448, 31.5, 26, "RTX 3080 Laptop spec (16 GB, 14 Gbps); "
                    "PCIe 4.0 x16; laptop DDR4"),
    "RTX4090": GPU("RTX 4090", 24.0, 1008, 31.5, 45, "RTX 4090 spec; PCIe 4.0 x16; desktop DDR5"),
}

# config.json fields the architecture adapters read (public Hugging Face configs of these checkpoints).
MODELS = {
    "mixtral-8x7b": {"model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
                     "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                     "num_local_experts": 8, "num_experts_per_tok": 2, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
                     "max_position_embeddings": 32768},
    "qwen3-30b-a3b": {"model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 2048,
                      "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
                      "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
                      "num_experts_per_tok": 8, "norm_topk_prob": True, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
                      "max_position_embeddings": 40960, "decoder_sparse_step": 1, "mlp_only_layers": []},
    "gpt-oss-20b": {"model_type": "gpt_oss", "vocab_size": 201088, "hidden_size": 2880, "intermediate_size": 2880,
                    "num_hidden_layers": 24, "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64,
                    "num_local_experts": 32, "num_experts_per_tok": 4, "sliding_window": 128,
                    "layer_types": ["sliding_attention", "full_attention"] * 12, "rope_theta": 150000,
                    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "attention_bias": True,
                    "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                     "original_max_position_embeddings": 4096, "truncate": False}},
    # Qwen3.5-35B-A3B: transformers' Qwen3_5MoeTextConfig defaults are this checkpoint's text model
    "qwen3.5-35b-a3b": {"model_type": "qwen3_5_moe_text", "vocab_size": 248320, "hidden_size": 2048,
                        "num_hidden_layers": 40, "num_attention_heads": 16, "num_key_value_heads": 2, "head_dim": 256,
                        "linear_num_key_heads": 16, "linear_num_value_heads": 32, "linear_key_head_dim": 128,
                        "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4, "num_experts": 256,
                        "num_experts_per_tok": 8, "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512,
                        "layer_types": (["linear_attention"] * 3 + ["full_attention"]) * 10,
                        "max_position_embeddings": 32768,
                        "rope_parameters": {"rope_theta": 1e7, "partial_rotary_factor": 0.25, "rope_type": "default"}},
    # DeepSeek-V2-Lite and GLM-4.5-Air: the fields of their public config.json that set what a token reads (their
    # YaRN / rope details left out: they change no sizes)
    "deepseek-v2-lite": {"model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 2048,
                         "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
                         "num_attention_heads": 16, "num_key_value_heads": 16, "q_lora_rank": None, "kv_lora_rank": 512,
                         "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 64,
                         "n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1,
                         "topk_method": "greedy", "rms_norm_eps": 1e-6, "max_position_embeddings": 32768},
    "glm-4.5-air": {"model_type": "glm4_moe", "vocab_size": 151552, "hidden_size": 4096, "intermediate_size": 10944,
                    "moe_intermediate_size": 1408, "num_hidden_layers": 46, "num_attention_heads": 96,
                    "num_key_value_heads": 8, "head_dim": 128, "partial_rotary_factor": 0.5, "attention_bias": True,
                    "n_routed_experts": 128, "n_shared_experts": 1, "num_experts_per_tok": 8,
                    "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1, "norm_topk_prob": True,
                    "rms_norm_eps": 1e-5, "rope_theta": 1e6, "max_position_embeddings": 131072},
}

PAPER = "Eliseev & Mazur 2023, arXiv 2312.17238, Table 2 (Mixtral-8x7B, attention 4-bit, experts 2-bit)"

# tok/s per algorithm and GPU. The T4 and RTX 3060 "full" and "naive" values are also the anchors in DESIGN.md
# (2.09 / 2.28, 0.66 / 0.92); the others are as recalled from the same table: check them against the paper
# before quoting them elsewhere.
PUBLISHED = {
    "full": {"A100": 3.061, "RTX3080M": 2.655, "RTX3060": 2.278, "T4": 2.092},
    "no-preload": {"A100": 2.918, "RTX3080M": 2.227, "RTX3060": 2.051, "T4": 1.567},
    "no-lru-no-preload": {"A100": 2.265, "RTX3080M": 1.758, "RTX3060": 1.547, "T4": 1.168},
    "naive": {"A100": 1.392, "RTX3080M": 1.059, "RTX3060": 0.919, "T4": 0.661},
}
FIT_ON, PREDICT = ("T4", "RTX3060"), ("A100", "RTX3080M")

# The paper's setup, as its code release runs it (assumptions where the paper does not state a value): HQQ 2-bit
# experts in groups of 16 with 8-bit scales and zeros in groups of 128, 4-bit attention in groups of 64; 4 cached
# experts a layer (its demo's offload_per_layer=4), 3 on 12 GB cards; speculative loading of the next layer's 2
# likeliest experts (how often it guesses right is fitted: its Figure 2 shows roughly 0.8-0.95 one layer ahead).
PAPER_EXPERT_BITS, PAPER_EXPERT_GROUP = 2, 16
PAPER_CACHE = {"T4": 4, "RTX3060": 3, "A100": 4, "RTX3080M": 4}
PAPER_PREFETCH = 2
