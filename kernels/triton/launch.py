"""Host side of the Triton kernels: prepared weights, grids, GEMV/GEMM choice."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from offload.kernels.triton.qmm import ACT_GPT_OSS, ACT_NONE, ACT_SILU, INTERPRET, qmm_kernel
from offload.kernels.triton.tiles import FMT_HQQ, FMT_MXFP4
from offload.quant.hqq import hqq_scale_zero
from offload.quant.tensor import QuantizedTensor

GEMV_MAX_M = 8
ACTIVATIONS = {"silu": ACT_SILU, "gpt_oss": ACT_GPT_OSS}


@dataclass
class TritonWeight:
    """Kernel operands: packed codes as stored, metadata expanded to fp32 on the device."""

    fmt: int
    bits: int
    group: int
    axis: int
    shape: tuple[int, int]
    q: torch.Tensor
    high: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor

    @classmethod
    def from_quantized(cls, qt: QuantizedTensor) -> "TritonWeight":
        t = qt.tensors
        if qt.fmt == "mxfp4":
            return cls(FMT_MXFP4, 4, 32, 1, qt.shape, t["blocks"], t["blocks"], t["scales"], t["scales"])
        if qt.fmt != "hqq":
            raise ValueError(f"Triton kernels take 'hqq' or 'mxfp4' weights, not {qt.fmt!r}")
        scale, zero = hqq_scale_zero(qt)
        return cls(FMT_HQQ, qt.bits, int(qt.params["group_size"]), int(qt.params["axis"]), qt.shape,
                   t["qweight"], t.get("qhigh", t["qweight"]), scale.contiguous(), zero.contiguous())

    def operands(self) -> tuple[torch.Tensor, ...]:
        return self.q, self.high, self.scale, self.zero

    def same_kind(self, other: "TritonWeight") -> bool:
        return (self.fmt, self.bits, self.group, self.axis, self.shape) == \
            (other.fmt, other.bits, other.group, other.axis, other.shape)


def _launch(x: torch.Tensor, w: TritonWeight, w2: TritonWeight | None, act: int,
            bias: torch.Tensor | None, bias2: torch.Tensor | None) -> torch.Tensor:
    n, k = w.shape
    a = x.reshape(-1, k).contiguous()
    m = a.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    gemv = m <= GEMV_MAX_M
    block_m = triton.next_power_of_2(m) if gemv else (16 if INTERPRET else 64)
    second = w2 or w
    has_bias = bias is not None
    b1 = bias if has_bias else w.scale
    b2 = bias2 if bias2 is not None else b1
    grid = lambda meta: (triton.cdiv(m, block_m), triton.cdiv(n, meta["BLOCK_N"]))  # noqa: E731
    qmm_kernel[grid](a, out, b1, *w.operands(), b2, *second.operands(), m, n, k, a.stride(0), out.stride(0),
                     FMT=w.fmt, BITS=w.bits, GROUP=w.group, AXIS=w.axis, HAS_BIAS=has_bias, ACT=act,
                     USE_DOT=not gemv, LOWP_DOT=not INTERPRET, BLOCK_M=block_m)
    return out.reshape(*x.shape[:-1], n)


def triton_qmm(x: torch.Tensor, w: TritonWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ W^T (+ bias) -> [..., N] in x.dtype."""
    return _launch(x, w, None, ACT_NONE, bias, None)


def triton_expert_gate_up(x: torch.Tensor, gate: TritonWeight, up: TritonWeight, activation: str = "silu",
                          gate_bias: torch.Tensor | None = None, up_bias: torch.Tensor | None = None) -> torch.Tensor:
    """act(x @ Wg^T + bg) * (x @ Wu^T + bu) in one pass over x (gpt-oss: its clamped variant)."""
    if not gate.same_kind(up):
        raise ValueError("fused gate/up needs gate and up in the same format, bits, group and shape")
    if (gate_bias is None) != (up_bias is None):
        raise ValueError("pass both gate_bias and up_bias, or neither")
    return _launch(x, gate, up, ACTIVATIONS[activation], gate_bias, up_bias)
