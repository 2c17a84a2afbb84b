"""Triton kernels: fused unpack + dequant + matmul on our packed formats (CUDA, or the
interpreter on CPU when TRITON_INTERPRET=1 is set before this package is imported)."""
from offload.kernels.triton.launch import triton_expert_gate_up, triton_qmm

__all__ = ["triton_expert_gate_up", "triton_qmm"]
