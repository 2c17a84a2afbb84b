"""Dequant-matmul kernels on offload.quant formats: torch CPU path and Triton (CUDA)."""
from offload.kernels.activations import ACTIVATIONS, gpt_oss_glu, swiglu
from offload.kernels.dispatch import BACKENDS, expert_mlp, prepare, qmatmul

__all__ = ["ACTIVATIONS", "BACKENDS", "expert_mlp", "gpt_oss_glu", "prepare", "qmatmul", "swiglu"]
