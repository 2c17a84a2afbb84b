"""NF4 via bitsandbytes (double-quantized absmax, as in QLoRA: ~4.13 bit/param)."""
from __future__ import annotations

import torch
from offload.quant.imports import bitsandbytes
from offload.quant.tensor import QuantizedTensor, register_format
from offload.quant.validate import check_choice, check_weight

NF4_BLOCKS = (32, 64, 128, 256)


def quantize_nf4(weight: torch.Tensor, block_size: int = 64, *, name: str = "weight") -> QuantizedTensor:
    check_weight(weight, name)
    check_choice(block_size, NF4_BLOCKS, "NF4 block size", name)
    if weight.numel() % block_size:
        raise ValueError(f"{name}: {weight.numel()} elements are not divisible by the NF4 block size "
                         f"{block_size}; pick a block size that divides it")
    packed, qs = bitsandbytes().functional.quantize_4bit(weight.to(torch.bfloat16), blocksize=block_size,
                                    compress_statistics=True, quant_type="nf4")
    tensors = {"qweight": packed.view(-1), "absmax_q": qs.absmax, "absmax_nested": qs.state2.absmax,
               "absmax_offset": qs.offset.float().reshape(1)}
    params = {"bits": 4, "group_size": block_size, "nested_block": qs.state2.blocksize}
    return QuantizedTensor("nf4", tuple(weight.shape), params, tensors)


def nf4_state(qt: QuantizedTensor, dtype: torch.dtype = torch.bfloat16):
    """Rebuild bitsandbytes' QuantState around our stored tensors (no copies)."""
    bnbf = bitsandbytes().functional
    t, dev = qt.tensors, qt.device
    nested = bnbf.QuantState(absmax=t["absmax_nested"], code=bnbf.create_dynamic_map(signed=True).to(dev),
                             blocksize=int(qt.params["nested_block"]), dtype=torch.float32)
    return bnbf.QuantState(absmax=t["absmax_q"], shape=torch.Size(qt.shape),
                           code=bnbf.get_4bit_type("nf4", device=dev), blocksize=int(qt.params["group_size"]),
                           quant_type="nf4", dtype=dtype, offset=t["absmax_offset"][0], state2=nested)


@register_format("nf4")
def dequantize_nf4(qt: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    out = bitsandbytes().functional.dequantize_4bit(qt.tensors["qweight"].view(-1, 1), nf4_state(qt))
    return out.to(dtype)
