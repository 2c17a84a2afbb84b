"""Device-side decoders: one [BLOCK_K, BLOCK_N] fp32 tile of W^T from the packed formats.

Everything is upcast to fp32 before arithmetic (the interpreter computes bf16 wrongly).
The address arithmetic mirrors offload.quant.layout (tiles of 64 rows).
"""
import triton
import triton.language as tl

FMT_HQQ = 0
FMT_MXFP4 = 1


@triton.jit
def _hqq_codes(q_ptr, h_ptr, n, k, K, mask, BITS: tl.constexpr):
    tile = n // 64
    r = n % 64
    if BITS == 4:
        half = r // 32
        rr = r % 32
        byte = tl.load(q_ptr + tile * (32 * K) + half * (16 * K) + k * 16 + rr % 16, mask=mask, other=0)
        code = (byte.to(tl.int32) >> (4 * (rr // 16))) & 15
    else:
        a = r // 16
        pos = (a & 1) * 2 + (a >> 1)  # layout.TWO_BIT_POS
        byte = tl.load(q_ptr + tile * (16 * K) + k * 16 + r % 16, mask=mask, other=0)
        code = (byte.to(tl.int32) >> (2 * pos)) & 3
        if BITS == 3:
            a8 = r // 8
            shift = (a8 & 1) | (((a8 >> 2) & 1) << 1) | (((a8 >> 1) & 1) << 2)  # layout.ONE_BIT_SHIFT
            hb = tl.load(h_ptr + tile * (8 * K) + k * 8 + r % 8, mask=mask, other=0)
            code = code | (((hb.to(tl.int32) >> shift) & 1) << 2)
    return code


@triton.jit
def _mxfp4_tile(q_ptr, s_ptr, n, k, K, mask):
    byte = tl.load(q_ptr + n * (K // 2) + k // 2, mask=mask, other=0).to(tl.int32)
    nib = (byte >> ((k % 2) * 4)) & 15
    e = ((nib >> 1) & 3).to(tl.float32)
    m = (nib & 1).to(tl.float32)
    mag = tl.where(e == 0.0, 0.5 * m, (1.0 + 0.5 * m) * tl.exp2(e - 1.0))
    val = tl.where((nib >> 3) == 1, -mag, mag)
    s = tl.load(s_ptr + n * (K // 32) + k // 32, mask=mask, other=127).to(tl.float32)
    return val * tl.exp2(s - 127.0)


@triton.jit
def weight_tile(q_ptr, h_ptr, s_ptr, z_ptr, offs_n, offs_k, N, K, k0,
                FMT: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, AXIS: tl.constexpr,
                BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """fp32 tile W[offs_n, offs_k]^T of shape [BLOCK_K, BLOCK_N]; zero outside the matrix. offs_k starts at
    k0. AXIS=1 groups (consecutive inputs of a row; the quantizer ensures GROUP | K) load each group's scale and
    zero once per row, not once per element."""
    n = offs_n[None, :]
    k = offs_k[:, None]
    mask = (n < N) & (k < K)
    if FMT == 1:
        w = _mxfp4_tile(q_ptr, s_ptr, n, k, K, mask)
    else:
        code = _hqq_codes(q_ptr, h_ptr, n, k, K, mask, BITS).to(tl.float32)
        if AXIS == 1:
            if BLOCK_K <= GROUP:  # the whole tile lies in one group per row
                g = offs_n * (K // GROUP) + k0 // GROUP
                s = tl.load(s_ptr + g, mask=offs_n < N, other=0.0)
                z = tl.load(z_ptr + g, mask=offs_n < N, other=0.0)
                w = (code - z[None, :]) * s[None, :]
            else:  # BLOCK_K // GROUP groups per row: [groups, GROUP, BLOCK_N] against [groups, 1, BLOCK_N]
                gk = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
                g = offs_n[None, :] * (K // GROUP) + gk[:, None]
                gmask = (offs_n[None, :] < N) & (gk[:, None] < K // GROUP)
                s = tl.load(s_ptr + g, mask=gmask, other=0.0)
                z = tl.load(z_ptr + g, mask=gmask, other=0.0)
                w3 = (tl.reshape(code, (BLOCK_K // GROUP, GROUP, BLOCK_N)) - z[:, None, :]) * s[:, None, :]
                w = tl.reshape(w3, (BLOCK_K, BLOCK_N))
        else:
            g = (n * K + k) % ((N * K) // GROUP)
            s = tl.load(s_ptr + g, mask=mask, other=0.0)
            z = tl.load(z_ptr + g, mask=mask, other=0.0)
            w = (code - z) * s
    return w
