"""One kernel for y = x @ W^T and for the fused expert gate/up (act(x @ Wg^T) * (x @ Wu^T)).

USE_DOT=False is the decode GEMV (M <= 8: broadcast-multiply + reduce, no tensor-core
padding waste); USE_DOT=True is the tiled prefill GEMM. SPLIT_K > 1 splits K across programs so a
decode GEMV fills the GPU; each program then stores its raw partial sums and the host adds them
in a fixed order (deterministic, unlike atomics) and applies the epilogue.
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
            for bn, bk, w, st in ((64, 64, 4, 3), (64, 128, 4, 2), (128, 64, 8, 2), (32, 128, 4, 3),
                                  (64, 32, 4, 4), (32, 64, 2, 4))]


@triton.jit
def _accumulate(acc, x, w, DT: tl.constexpr, USE_DOT: tl.constexpr, LOWP_DOT: tl.constexpr):
    if USE_DOT:
        if LOWP_DOT:  # tensor cores in the input dtype, fp32 accumulation
            acc += tl.dot(x.to(DT), w.to(DT))
        else:
            acc += tl.dot(x, w, input_precision="ieee")
    else:
        acc += tl.sum(x[:, :, None] * w[None, :, :], axis=1)
    return acc


@triton.autotune(configs=_configs(),
                 key=["N", "K", "BLOCK_M", "USE_DOT", "SPLIT_K", "ACT", "FMT", "BITS", "GROUP", "AXIS"])
@triton.jit
def qmm_kernel(x_ptr, out_ptr, bias_ptr, q_ptr, h_ptr, s_ptr, z_ptr,
               bias2_ptr, q2_ptr, h2_ptr, s2_ptr, z2_ptr,
               M, N, K, stride_xm, stride_om,
               FMT: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, AXIS: tl.constexpr,
               HAS_BIAS: tl.constexpr, ACT: tl.constexpr, USE_DOT: tl.constexpr, LOWP_DOT: tl.constexpr,
               SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_span = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K  # whole blocks, so groups never straddle splits
    k_start = tl.program_id(2) * k_span
    for k0 in range(k_start, tl.minimum(k_start + k_span, K), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0).to(tl.float32)
        w = weight_tile(q_ptr, h_ptr, s_ptr, z_ptr, offs_n, offs_k, N, K, k0, FMT, BITS, GROUP, AXIS,
                        BLOCK_K, BLOCK_N)
        acc = _accumulate(acc, x, w, x_ptr.dtype.element_ty, USE_DOT, LOWP_DOT)
        if ACT != 0:
            w2 = weight_tile(q2_ptr, h2_ptr, s2_ptr, z2_ptr, offs_n, offs_k, N, K, k0, FMT, BITS, GROUP, AXIS,
                             BLOCK_K, BLOCK_N)
            acc2 = _accumulate(acc2, x, w2, x_ptr.dtype.element_ty, USE_DOT, LOWP_DOT)
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
