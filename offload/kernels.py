"""Dequant-matmul kernels on offload.quant formats: torch CPU path and Triton (CUDA)."""
from offload._folders import package_path

__path__ = package_path(__file__, "kernels")  # a package over the top-level kernels/ folder (offload/_folders.py)
from offload.kernels.activations import ACTIVATIONS, gpt_oss_glu, swiglu
from offload.kernels.dispatch import BACKENDS, expert_mlp, prepare, qmatmul

__all__ = ["ACTIVATIONS", "BACKENDS", "expert_mlp", "gpt_oss_glu", "prepare", "qmatmul", "swiglu"]
