"""RMSNorm against transformers' own module, bit for bit, in the dtypes models run in."""
import pytest
import torch
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm

from offload.model.norm import rms_norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("size", [16, 1000, 2048])
def test_rms_norm_is_transformers_bit_for_bit(size, dtype):
    g = torch.Generator().manual_seed(size)
    reference = Qwen3MoeRMSNorm(size, eps=1e-6)
    with torch.no_grad():
        reference.weight.copy_(torch.rand(size, generator=g) + 0.5)
    reference = reference.to(dtype)
    x = (torch.randn(3, 5, size, generator=g) * 4).to(dtype)
    expected = reference(x)
    # two rows of weights normalise two rows of x independently (the joint q/k norm, attention.py)
    pair = torch.stack((reference.weight.detach().flip(0), reference.weight.detach()))
    joint = rms_norm(x.view(3, 5, 1, size).expand(3, 5, 2, size), pair, 1e-6)[:, :, 1]
    for got in (rms_norm(x, reference.weight.detach(), 1e-6), joint):
        if dtype == torch.float32:  # torch's fused op there: the same to fp32 rounding, not bit for bit
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(got, expected)
