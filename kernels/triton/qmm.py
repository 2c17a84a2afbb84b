"""Two kernels over the packed formats.

`qmm_kernel`: the decode GEMV y = x @ W^T for M <= 8, and the fused expert gate/up
act(x @ Wg^T) * (x @ Wu^T). Each program keeps an elementwise [M, BLOCK_K, BLOCK_N] accumulator
and reduces over K once at the end (a reduction per K step would shuffle across threads every
step). SPLIT_K > 1 splits K across programs so the GEMV fills the GPU; each program then stores
its raw partial sums and the host adds them in a fixed order (deterministic, unlike atomics) and
applies the epilogue.

`dequant_kernel`: W -> dense [N, K] in the activations' dtype, for prefill, where cuBLAS on the
dequantized weight beats re-decoding the weight for every block of rows.
"""
import os

import triton
import triton.language as tl
from offload.kernels.triton.tiles import weight_tile

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ACT_NONE, ACT_SILU, ACT_GPT_OSS = 0, 1, 2


def _configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32}, num_warps=1)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
            for bn, bk, w, st in ((32, 32, 4, 3), (32, 64, 4, 3), (64, 32, 4, 3), (64, 64, 4, 2),
                                  (32, 128, 4, 2), (64, 64, 8, 3), (64, 128, 8, 3), (32, 256, 8, 3),
                                  (64, 256, 8, 2), (128, 64, 8, 3))]


@triton.autotune(configs=_configs(), key=["N", "K", "BLOCK_M", "SPLIT_K", "ACT", "FMT", "BITS", "GROUP", "AXIS"])
@triton.jit
def qmm_kernel(x_ptr, out_ptr, bias_ptr, q_ptr, h_ptr, s_ptr, z_ptr,
               bias2_ptr, q2_ptr, h2_ptr, s2_ptr, z2_ptr,
               M, N, K, stride_xm, stride_om,
               FMT: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, AXIS: tl.constexpr,
               HAS_BIAS: tl.constexpr, ACT: tl.constexpr, SPLIT_K: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc3 = tl.zeros((BLOCK_M, BLOCK_K, BLOCK_N), dtype=tl.float32)
    acc3b = tl.zeros((BLOCK_M, BLOCK_K, BLOCK_N), dtype=tl.float32)
    k_span = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K  # whole blocks, so groups never straddle splits
    k_start = tl.program_id(2) * k_span
    for k0 in range(k_start, tl.minimum(k_start + k_span, K), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0).to(tl.float32)
        w = weight_tile(q_ptr, h_ptr, s_ptr, z_ptr, offs_n, offs_k, N, K, k0, FMT, BITS, GROUP, AXIS,
                        BLOCK_K, BLOCK_N)
        acc3 += x[:, :, None] * w[None, :, :]
        if ACT != 0:
            w2 = weight_tile(q2_ptr, h2_ptr, s2_ptr, z2_ptr, offs_n, offs_k, N, K, k0, FMT, BITS, GROUP, AXIS,
                             BLOCK_K, BLOCK_N)
            acc3b += x[:, :, None] * w2[None, :, :]
    acc = tl.sum(acc3, axis=1)
    acc2 = tl.sum(acc3b, axis=1)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if SPLIT_K > 1:  # partials [2 if ACT else 1, SPLIT_K, M, N] fp32; the host finishes
        part = out_ptr + tl.program_id(2) * M * N + offs_m[:, None] * N + offs_n[None, :]
        tl.store(part, acc, mask=mask)
        if ACT != 0:
            tl.store(part + SPLIT_K * M * N, acc2, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
            if ACT != 0:
                acc2 += tl.load(bias2_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        if ACT == 1:  # SwiGLU: silu(gate) * up
            acc = acc / (1.0 + tl.exp(-acc)) * acc2
        elif ACT == 2:  # gpt-oss: gate <= 7, |up| <= 7, (up + 1) * gate * sigmoid(1.702 * gate)
            g = tl.minimum(acc, 7.0)
            u = tl.minimum(tl.maximum(acc2, -7.0), 7.0)
            acc = (u + 1.0) * g / (1.0 + tl.exp(-1.702 * g))
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def dequant_kernel(out_ptr, q_ptr, h_ptr, s_ptr, z_ptr, N, K,
                   FMT: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, AXIS: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    w = weight_tile(q_ptr, h_ptr, s_ptr, z_ptr, offs_n, offs_k, N, K, k0, FMT, BITS, GROUP, AXIS, BLOCK_K, BLOCK_N)
    tl.store(out_ptr + offs_n[None, :] * K + offs_k[:, None], w.to(out_ptr.dtype.element_ty),
             mask=(offs_n[None, :] < N) & (offs_k[:, None] < K))
