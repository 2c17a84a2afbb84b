"""RMSNorm computed in fp32 and cast back, as transformers does."""
import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight [..., H] may hold one row per leading index of x's last dims (joint q/k norms, attention.py)."""
    if x.dtype == weight.dtype == torch.float32 and weight.dim() == 1:  # torch's fused op, weight included
        return F.rms_norm(x, weight.shape, weight, eps)
    # 16-bit: normed in fp32 (torch's op: 4 ops where pow, mean, add, rsqrt, mul were 8, the same bits), cast back
    # before the weight, as transformers rounds
    return weight * F.rms_norm(x.float(), x.shape[-1:], None, eps).to(x.dtype)
