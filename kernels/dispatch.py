"""qmatmul / expert_mlp: pick the kernel for a weight's format and device.

`prepare` turns a stored QuantizedTensor into the compute-ready form (the engine does it
when an expert lands in a slot). qmatmul / expert_mlp on a raw QuantizedTensor prepare it
once and keep the form on the tensor (`QuantizedTensor.derived`): preparing per call cost
up to 40x the product itself (322-364 ms against 2.5 ms for 4096x14336 on AVX-512).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from offload.kernels.activations import ACTIVATIONS
from offload.kernels import native
from offload.kernels.cpu import prepare_cpu
from offload.quant.imports import bitsandbytes
from offload.quant.nf4 import nf4_state
from offload.quant.tensor import QuantizedTensor

BACKENDS = ("cpu", "triton")


class Prepared(Protocol):
    def matmul(self, x: torch.Tensor) -> torch.Tensor: ...


@dataclass
class DequantWeight:
    """Fallback: dequantize, then a dense matmul (HQQ axis=0 / group 16 on CPU; MXFP4 without our GEMV)."""

    qt: QuantizedTensor

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.qt.dequantize(x.dtype).t()


@dataclass
class NF4Weight:
    """bitsandbytes' own 4-bit matmul (CPU and CUDA)."""

    qt: QuantizedTensor

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        state = nf4_state(self.qt, x.dtype)
        return bitsandbytes().matmul_4bit(x, self.qt.tensors["qweight"].view(-1, 1).t(), state)


@dataclass
class TritonPrepared:
    """Triton kernels (imported lazily: TRITON_INTERPRET must be set before the first import)."""

    weight: object

    @classmethod
    def from_quantized(cls, qt: QuantizedTensor) -> "TritonPrepared":
        from offload.kernels.triton.launch import TritonWeight

        return cls(TritonWeight.from_quantized(qt))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        from offload.kernels.triton.launch import triton_qmm

        return triton_qmm(x, self.weight)


def prepare(w: QuantizedTensor, backend: str | None = None) -> Prepared:
    """Compute-ready form of `w` for `backend` ("cpu" | "triton"; default: by w's device)."""
    backend = backend or ("triton" if w.device.type == "cuda" else "cpu")
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; use one of {list(BACKENDS)}")
    if w.fmt == "nf4":
        return NF4Weight(w)
    if backend == "triton":
        return TritonPrepared.from_quantized(w)
    return prepare_cpu(w) or DequantWeight(w)


def _stamp(t: torch.Tensor) -> tuple[int, int | None]:
    """Where a tensor's bytes are and how often they were written in place (inference tensors keep no count)."""
    return t.data_ptr(), None if t.is_inference() else t._version


def prepared_form(w: QuantizedTensor | Prepared, backend: str | None = None) -> Prepared:
    """`w` if already prepared, else its prepared form, made once and kept on the tensor. The entry is keyed by
    backend and GEMV build and checked against the tensors' addresses and version counters, so it is remade
    when a tensor is replaced or written in place (e.g. a reused slot). Inference tensors have no version
    counter: a QuantizedTensor over them must not have its bytes rewritten (the engine never does: slots are
    prepared explicitly, and host blobs are replaced, not rewritten)."""
    if not isinstance(w, QuantizedTensor):
        return w
    key = (backend or ("triton" if w.device.type == "cuda" else "cpu"), native.chosen_isa())
    stamp = tuple(_stamp(t) for t in w.tensors.values())
    hit = w.derived.get(key)
    if hit is None or hit[0] != stamp:
        hit = w.derived[key] = (stamp, prepare(w, backend))
    return hit[1]


def qmatmul(x: torch.Tensor, w: QuantizedTensor | Prepared, bias: torch.Tensor | None = None,
            backend: str | None = None) -> torch.Tensor:
    """x [..., in] @ W.T (+ bias) -> [..., out] in x.dtype, W the dequantized weight [out, in]."""
    prepared = prepared_form(w, backend)
    y = prepared.matmul(x)
    return y + bias if bias is not None else y


def expert_mlp(x: torch.Tensor, gate: QuantizedTensor | Prepared, up: QuantizedTensor | Prepared,
               down: QuantizedTensor | Prepared, activation: str = "silu", gate_bias: torch.Tensor | None = None,
               up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None,
               backend: str | None = None) -> torch.Tensor:
    """down(act(gate(x)) * up(x)); gate/up fused in one Triton kernel when both are Triton weights."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown expert activation {activation!r}; use one of {sorted(ACTIVATIONS)}")
    g, u = (prepared_form(t, backend) for t in (gate, up))
    if isinstance(g, TritonPrepared) and isinstance(u, TritonPrepared):
        from offload.kernels.triton.launch import triton_expert_gate_up

        h = triton_expert_gate_up(x, g.weight, u.weight, activation, gate_bias, up_bias)
    else:
        h = ACTIVATIONS[activation](qmatmul(x, g, gate_bias), qmatmul(x, u, up_bias))
    return qmatmul(h, down, down_bias, backend)
