"""CPU kernel path: qmatmul / expert_mlp vs x @ W_deq.T for every format."""
import pytest
import torch
from offload.kernels import expert_mlp, gpt_oss_glu, prepare, qmatmul, swiglu
from offload.kernels import native
from offload.kernels.cpu import Int4PackWeight, TileWeight
from offload.quant import from_mxfp4, quantize
from offload.quant.imports import bitsandbytes_runs_here

torch.manual_seed(0)
W = torch.randn(96, 256)
MX = from_mxfp4(torch.randint(0, 256, (96, 8, 16), dtype=torch.uint8), torch.randint(120, 130, (96, 8), dtype=torch.uint8))
FORMATS = {
    **{f"hqq{b}-g{g}": quantize(W, b, g) for b in (2, 3, 4) for g in (32, 64, 128)},
    "hqq4-g16": quantize(W, 4, 16), "hqq2-axis0": quantize(W, 2, 32, axis=0),
    "mxfp4": MX, **({"nf4": quantize(W, 4, 64, fmt="nf4")} if bitsandbytes_runs_here() else {}),
}


def rel_err(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("name", sorted(FORMATS))
def test_qmatmul_cpu_matches_dequantized_reference(name, m):
    qt = FORMATS[name]
    x = torch.randn(2, m, 256, dtype=torch.bfloat16)
    y = qmatmul(x, qt)
    ref = x.float() @ qt.dequantize(torch.float32).t()
    assert y.shape == (2, m, 96) and y.dtype == torch.bfloat16
    assert rel_err(y, ref) < 1e-2


def test_axis1_hqq_takes_tiles_and_prepared_equals_unprepared():
    qt = FORMATS["hqq3-g64"]
    prepared = prepare(qt)
    assert isinstance(prepared, TileWeight if native.gemv() else Int4PackWeight)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    bias = torch.randn(96, dtype=torch.bfloat16)
    assert torch.equal(qmatmul(x, prepared, bias), qmatmul(x, qt, bias))


@pytest.mark.parametrize("activation,act", [("silu", swiglu), ("gpt_oss", gpt_oss_glu)])
def test_expert_mlp_cpu(activation, act):
    gate, up = quantize(torch.randn(64, 96), 2, 32), quantize(torch.randn(64, 96), 2, 32)
    down = quantize(torch.randn(96, 64), 4, 32)
    x = torch.randn(4, 96, dtype=torch.bfloat16)
    bg, bu, bd = torch.randn(64), torch.randn(64), torch.randn(96)
    y = expert_mlp(x, gate, up, down, activation, bg.bfloat16(), bu.bfloat16(), bd.bfloat16())
    xf = x.float()
    h = act(xf @ gate.dequantize(torch.float32).t() + bg, xf @ up.dequantize(torch.float32).t() + bu)
    ref = h @ down.dequantize(torch.float32).t() + bd
    assert rel_err(y, ref) < 2e-2


def test_gpt_oss_activation_clamps():
    g = torch.tensor([10.0, -10.0, 0.0])
    u = torch.tensor([10.0, -10.0, 1.0])
    expected = torch.tensor([8 * 7 * torch.sigmoid(torch.tensor(1.702 * 7)).item(),
                             -6 * -10 * torch.sigmoid(torch.tensor(-17.02)).item(), 0.0])
    assert torch.allclose(gpt_oss_glu(g, u), expected)


def test_unknown_backend_and_activation_rejected():
    with pytest.raises(ValueError, match="backend"):
        qmatmul(torch.randn(1, 256), FORMATS["hqq4-g64"], backend="cuda-magic")
    q = FORMATS["hqq2-g32"]
    with pytest.raises(ValueError, match="activation"):
        expert_mlp(torch.randn(1, 256), q, q, q, activation="gelu")
