"""RMSNorm computed in fp32 and cast back, as transformers does."""
import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == weight.dtype == torch.float32 and weight.dim() == 1:  # torch's fused op: one call instead of six (~9% of a CPU step)
        return F.rms_norm(x, weight.shape, weight, eps)
    h = x.float()  # 16-bit: cast back before the weight, as transformers rounds
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)
