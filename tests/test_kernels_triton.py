"""Triton kernels under the interpreter (CPU) vs the torch reference; small shapes with tails."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of the kernels

import pytest  # noqa: E402
import torch  # noqa: E402
from offload.kernels import expert_mlp, gpt_oss_glu, qmatmul, swiglu  # noqa: E402
from offload.quant import from_mxfp4, quantize  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="TRITON_INTERPRET was set to something else before this module")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
N, K = 72, 80  # N not a multiple of the 64-row tile nor of BLOCK_N; K has a tail after 2 blocks of 32


def ref_mm(x, qt):
    return x.float() @ qt.dequantize(torch.float32).t()


def close(y, ref, tol):
    return float((y.float() - ref).norm() / ref.norm()) < tol


@pytest.mark.parametrize("m", [1, 33])
@pytest.mark.parametrize("bits,axis", [(2, 1), (3, 1), (4, 1), (2, 0), (3, 0), (4, 0)])
def test_hqq_gemv_gemm(bits, axis, m):
    torch.manual_seed(bits * 10 + axis)
    qt = quantize(torch.randn(N, K) if axis == 1 else torch.randn(80, K), bits, 16, axis=axis).to(DEV)
    x = torch.randn(m, K, device=DEV)
    assert close(qmatmul(x, qt, backend="triton"), ref_mm(x, qt), 1e-5)


@pytest.mark.parametrize("m", [3, 8])
def test_decode_batch_sizes_bf16(m):
    qt = quantize(torch.randn(N, K), 3, 16).to(DEV)
    x = torch.randn(m, K, device=DEV, dtype=torch.bfloat16)
    y = qmatmul(x, qt, backend="triton")
    assert y.dtype == torch.bfloat16 and close(y, ref_mm(x, qt), 1e-2)


@pytest.mark.parametrize("m", [1, 33])
def test_mxfp4(m):
    g = torch.Generator().manual_seed(3)
    qt = from_mxfp4(torch.randint(0, 256, (40, 3, 16), dtype=torch.uint8, generator=g),
                    torch.randint(122, 132, (40, 3), dtype=torch.uint8, generator=g)).to(DEV)
    x = torch.randn(m, 96, device=DEV)
    assert close(qmatmul(x, qt, backend="triton"), ref_mm(x, qt), 1e-5)


@pytest.mark.parametrize("m", [1, 33])
@pytest.mark.parametrize("activation,act,bias", [("silu", swiglu, False), ("gpt_oss", gpt_oss_glu, True)])
def test_fused_expert_mlp(activation, act, bias, m):
    torch.manual_seed(m)
    gate, up = (quantize(torch.randn(N, K), 2, 16).to(DEV) for _ in range(2))
    down = quantize(torch.randn(K, N), 4, 16, axis=0).to(DEV)
    bg, bu = (torch.randn(N, device=DEV) if bias else None for _ in range(2))
    x = torch.randn(m, K, device=DEV)
    y = expert_mlp(x, gate, up, down, activation, bg, bu, backend="triton")
    g, u = ref_mm(x, gate), ref_mm(x, up)
    if bias:
        g, u = g + bg, u + bu
    assert close(y, act(g, u) @ down.dequantize(torch.float32).t(), 1e-5)


@pytest.mark.parametrize("group,k", [(16, 80), (64, 128), (32, 96)])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_group_layouts(bits, group, k):
    """Groups smaller than the K block (several per tile) and as large or larger (one per tile row)."""
    torch.manual_seed(bits + group + k)
    qt = quantize(torch.randn(N, k), bits, group).to(DEV)
    for m in (1, 33):
        x = torch.randn(m, k, device=DEV)
        assert close(qmatmul(x, qt, backend="triton"), ref_mm(x, qt), 1e-5), (m, bits, group, k)


@pytest.mark.parametrize("m", [1, 3])
def test_split_k_gemv(m):
    """K split across programs: partial sums added on the host give the same product, fused gate/up and
    biases included."""
    from offload.kernels import prepare
    from offload.kernels.triton.launch import triton_expert_gate_up, triton_qmm

    torch.manual_seed(m)
    k = 160
    w, w2 = (quantize(torch.randn(N, k), bits, 32).to(DEV) for bits in (4, 4))
    pw, pw2 = (prepare(t, "triton").weight for t in (w, w2))
    x, bias, bias2 = torch.randn(m, k, device=DEV), torch.randn(N, device=DEV), torch.randn(N, device=DEV)
    for split in (2, 3):
        assert close(triton_qmm(x, pw, bias, split=split), ref_mm(x, w) + bias, 1e-5)
        y = triton_expert_gate_up(x, pw, pw2, "gpt_oss", bias, bias2, split=split)
        assert close(y, gpt_oss_glu(ref_mm(x, w) + bias, ref_mm(x, w2) + bias2), 1e-5)
    with pytest.raises(ValueError, match="split_k"):
        triton_qmm(torch.randn(33, k, device=DEV), pw, split=2)
