"""HQQ 2/3/4-bit quantization: hqq's optimizer, our metadata compression and bit layout."""
from __future__ import annotations

import torch
from offload.quant.imports import hqq_quantizer
from offload.quant.layout import pack_codes, unpack_codes
from offload.quant.meta import dequantize_meta, quantize_meta
from offload.quant.tensor import QuantizedTensor, register_format
from offload.quant.validate import check_choice, check_divisible, check_weight

HQQ_BITS = (2, 3, 4)
HQQ_GROUPS = (16, 32, 64, 128)


def hqq_reference(weight: torch.Tensor, bits: int, group_size: int, axis: int = 1) -> torch.Tensor:
    """hqq's own round trip (16-bit metadata, hqq's bit packing): the quality baseline."""
    quantizer = hqq_quantizer()
    w_q, meta = quantizer.quantize(weight.float(), nbits=bits, group_size=group_size, axis=axis,
                                   device=str(weight.device), compute_dtype=torch.float32)
    meta["compute_dtype"] = torch.float32
    return quantizer.dequantize(w_q, meta)


def _group_view(w: torch.Tensor, group_size: int, axis: int) -> torch.Tensor:
    """hqq's grouping: axis=1 -> [G, g] (consecutive inputs), axis=0 -> [g, G]."""
    return w.reshape(-1, group_size) if axis == 1 else w.reshape(group_size, -1)


def quantize_hqq(weight: torch.Tensor, bits: int, group_size: int, axis: int = 1, *,
                 meta_bits: int | None = 8, meta_group: int = 128, name: str = "weight") -> QuantizedTensor:
    """Quantize W [out, in] with hqq's half-quadratic optimizer.

    meta_bits=8 stores scale/zero as 8-bit codes per `meta_group`; the weight codes are then
    re-rounded against the compressed metadata so the two errors do not stack.
    """
    check_weight(weight, name)
    check_choice(bits, HQQ_BITS, "bit width", name)
    check_choice(group_size, HQQ_GROUPS, "group size", name)
    check_choice(axis, (0, 1), "axis", name)
    n, k = weight.shape
    check_divisible(k if axis == 1 else n, group_size, "input" if axis == 1 else "output", name, weight.shape)
    w = weight.float()
    w_q, meta = hqq_quantizer().quantize(w, nbits=bits, group_size=group_size, axis=axis, bitpack=False,
                                   device=str(w.device), compute_dtype=torch.float32)
    scale, zero = meta["scale"].float().reshape(-1), meta["zero"].float().reshape(-1)
    tensors: dict[str, torch.Tensor] = {}
    if meta_bits:
        tensors["scale_q"], tensors["scale_affine"] = quantize_meta(scale, meta_bits, meta_group)
        tensors["zero_q"], tensors["zero_affine"] = quantize_meta(zero, meta_bits, meta_group)
        scale = dequantize_meta(tensors["scale_q"], tensors["scale_affine"], scale.numel())
        zero = dequantize_meta(tensors["zero_q"], tensors["zero_affine"], zero.numel())
        grouped = _group_view(w, group_size, axis)
        s, z = (scale.view(-1, 1), zero.view(-1, 1)) if axis == 1 else (scale.view(1, -1), zero.view(1, -1))
        w_q = (grouped / s + z).round_().clamp_(0, 2**bits - 1)
    else:
        tensors["scale"], tensors["zero"] = scale.half(), zero.half()
    codes = w_q.reshape(n, k).to(torch.uint8)
    params = {"bits": bits, "group_size": group_size, "axis": axis,
              "meta_bits": meta_bits or 0, "meta_group": meta_group}
    return QuantizedTensor("hqq", (n, k), params, {**pack_codes(codes, bits), **tensors})


def hqq_scale_zero(qt: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 scale and zero per group, flat in hqq's group order (w = (q - zero) * scale)."""
    count = qt.numel // int(qt.params["group_size"])
    t = qt.tensors
    if qt.params["meta_bits"]:
        return (dequantize_meta(t["scale_q"], t["scale_affine"], count),
                dequantize_meta(t["zero_q"], t["zero_affine"], count))
    return t["scale"].float(), t["zero"].float()


@register_format("hqq")
def dequantize_hqq(qt: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    n, k = qt.shape
    g, axis = int(qt.params["group_size"]), int(qt.params["axis"])
    codes = unpack_codes(qt.tensors, qt.bits, k)[:n].float()
    scale, zero = hqq_scale_zero(qt)
    grouped = _group_view(codes, g, axis)
    s, z = (scale.view(-1, 1), zero.view(-1, 1)) if axis == 1 else (scale.view(1, -1), zero.view(1, -1))
    return ((grouped - z) * s).reshape(n, k).to(dtype)
