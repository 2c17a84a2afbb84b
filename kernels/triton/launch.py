"""Host side of the Triton kernels: prepared weights, grids, the decode GEMV vs dequantize + matmul for prefill."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
from offload.kernels.activations import ACTIVATIONS as TORCH_ACTIVATIONS
from offload.kernels.triton.qmm import ACT_GPT_OSS, ACT_NONE, ACT_SILU, INTERPRET, dequant_kernel, qmm_kernel
from offload.kernels.triton.tiles import FMT_HQQ, FMT_MXFP4
from offload.quant.hqq import hqq_scale_zero
from offload.quant.tensor import QuantizedTensor

GEMV_MAX_M = 8
ACTIVATIONS = {"silu": ACT_SILU, "gpt_oss": ACT_GPT_OSS}
MIN_SPLIT_K = 1024  # fewer inputs per program and the partial sums cost more than they save
PROGRAMS_PER_SM = 8  # a decode GEMV wants at least this many programs per SM to cover memory latency


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


def split_k(m: int, n: int, k: int, device: torch.device) -> int:
    """K splits for a decode GEMV: enough programs to fill the GPU (N alone gives N/32-N/64 of them)."""
    if m > GEMV_MAX_M or INTERPRET or k < 2 * MIN_SPLIT_K:
        return 1
    programs = PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(-(-programs * 32 // n), k // MIN_SPLIT_K))


def dequantize(w: TritonWeight, dtype: torch.dtype) -> torch.Tensor:
    """W as a dense [N, K] tensor on the device, decoded by the same tile code as the GEMV."""
    n, k = w.shape
    out = torch.empty(n, k, dtype=dtype, device=w.q.device)
    block_n, block_k = (32, 32) if INTERPRET else (64, 64)
    dequant_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, block_k))](
        out, *w.operands(), n, k, FMT=w.fmt, BITS=w.bits, GROUP=w.group, AXIS=w.axis, BLOCK_N=block_n, BLOCK_K=block_k)
    return out


def _prefill(a: torch.Tensor, w: TritonWeight, w2: TritonWeight | None, act: str | None,
             bias: torch.Tensor | None, bias2: torch.Tensor | None) -> torch.Tensor:
    """M > GEMV_MAX_M: dequantize, then the library matmul (tensor cores at full rate)."""
    y = torch.nn.functional.linear(a, dequantize(w, a.dtype), bias)
    if not act:
        return y
    return TORCH_ACTIVATIONS[act](y, torch.nn.functional.linear(a, dequantize(w2, a.dtype), bias2))


def _launch(x: torch.Tensor, w: TritonWeight, w2: TritonWeight | None, act: str | None,
            bias: torch.Tensor | None, bias2: torch.Tensor | None, split: int | None) -> torch.Tensor:
    n, k = w.shape
    a = x.reshape(-1, k).contiguous()
    m = a.shape[0]
    if m > GEMV_MAX_M:
        if split not in (None, 1):
            raise ValueError(f"split_k applies to the decode GEMV (M <= {GEMV_MAX_M}), not M={m}")
        return _prefill(a, w, w2, act, bias, bias2).reshape(*x.shape[:-1], n)
    split = split or split_k(m, n, k, x.device)
    parts = 2 if act else 1
    out = torch.empty((parts, split, m, n) if split > 1 else (m, n), device=x.device,
                      dtype=torch.float32 if split > 1 else x.dtype)
    second = w2 or w
    has_bias = bias is not None
    b1 = bias if has_bias else w.scale
    b2 = bias2 if bias2 is not None else b1
    grid = lambda meta: (1, triton.cdiv(n, meta["BLOCK_N"]), split)  # noqa: E731
    qmm_kernel[grid](a, out, b1, *w.operands(), b2, *second.operands(), m, n, k, a.stride(0), out.stride(-2),
                     FMT=w.fmt, BITS=w.bits, GROUP=w.group, AXIS=w.axis, HAS_BIAS=has_bias,
                     ACT=ACTIVATIONS[act] if act else ACT_NONE, SPLIT_K=split, BLOCK_M=triton.next_power_of_2(m))
    if split > 1:  # add the partial sums in a fixed order, then the epilogue the kernel skipped
        y = out.sum(1)
        if has_bias:
            y = y + torch.stack([bias, b2])[:parts, None, :].float()
        out = (TORCH_ACTIVATIONS[act](y[0], y[1]) if act else y[0]).to(x.dtype)
    return out.reshape(*x.shape[:-1], n)


def triton_qmm(x: torch.Tensor, w: TritonWeight, bias: torch.Tensor | None = None,
               split: int | None = None) -> torch.Tensor:
    """x [..., K] @ W^T (+ bias) -> [..., N] in x.dtype. split: K splits of a decode GEMV (default: enough
    programs to fill the GPU)."""
    return _launch(x, w, None, None, bias, None, split)


def triton_expert_gate_up(x: torch.Tensor, gate: TritonWeight, up: TritonWeight, activation: str = "silu",
                          gate_bias: torch.Tensor | None = None, up_bias: torch.Tensor | None = None,
                          split: int | None = None) -> torch.Tensor:
    """act(x @ Wg^T + bg) * (x @ Wu^T + bu) in one pass over x (gpt-oss: its clamped variant)."""
    if not gate.same_kind(up):
        raise ValueError("fused gate/up needs gate and up in the same format, bits, group and shape")
    if (gate_bias is None) != (up_bias is None):
        raise ValueError("pass both gate_bias and up_bias, or neither")
    return _launch(x, gate, up, activation, gate_bias, up_bias, split)
