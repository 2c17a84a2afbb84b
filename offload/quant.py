"""Quantized formats for expert offloading: HQQ 2/3/4-bit, NF4, MXFP4, FP8 blocks, packed blobs."""
from __future__ import annotations

from offload._folders import package_path

__path__ = package_path(__file__, "quant")  # a package over the top-level quant/ folder (offload/_folders.py)

import torch  # noqa: E402
from offload.quant.fp8 import dequantize_fp8_blocks
from offload.quant.hqq import HQQ_BITS, HQQ_GROUPS, hqq_reference, quantize_hqq
from offload.quant.mxfp4 import from_mxfp4
from offload.quant.nf4 import quantize_nf4
from offload.quant.pack import pack_expert, read_index, unpack_expert
from offload.quant.presets import PRESETS, Preset, QuantSpec, get_preset
from offload.quant.tensor import QuantizedTensor


def quantize(weight: torch.Tensor, bits: int, group_size: int, axis: int = 1, *, fmt: str = "hqq",
             meta_bits: int | None = 8, meta_group: int = 128, name: str = "weight") -> QuantizedTensor:
    """Quantize W [out, in]: fmt "hqq" (2/3/4 bit) or "nf4" (bits must be 4)."""
    if fmt == "nf4":
        if bits != 4:
            raise ValueError(f"{name}: NF4 is 4-bit, got bits={bits}; use fmt='hqq' for 2/3 bits")
        return quantize_nf4(weight, group_size, name=name)
    if fmt != "hqq":
        raise ValueError(f"{name}: unknown format {fmt!r}; use 'hqq' or 'nf4' (MXFP4 via from_mxfp4)")
    return quantize_hqq(weight, bits, group_size, axis, meta_bits=meta_bits, meta_group=meta_group, name=name)


__all__ = [
    "HQQ_BITS", "HQQ_GROUPS", "PRESETS", "Preset", "QuantSpec", "QuantizedTensor", "dequantize_fp8_blocks",
    "from_mxfp4", "get_preset", "hqq_reference", "pack_expert", "quantize", "quantize_hqq", "quantize_nf4",
    "read_index", "unpack_expert",
]
