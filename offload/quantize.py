"""Apply a quantization preset (offload.quant.PRESETS) to loaded weights, by role: attention projections,
dense MLPs, routed experts. Router, norms, embeddings and the LM head stay 16-bit; weights that arrive
quantized (gpt-oss MXFP4 experts) are kept as they are."""
from __future__ import annotations

import re

from offload.kernels import prepare
from offload.kernels.fused_moe import ExpertWeights
from offload.quant import Preset, QuantizedTensor, QuantSpec, get_preset

from .loader import Quantizer

# Attention projections include the Gated DeltaNet's (qkv, z) input projections. MLA's kv_b stays 16-bit: decode
# folds it into the queries and outputs (model/mla.py). Shared experts are dense.
ROLES = [(re.compile(r"layers\.\d+\.attn\.([qkvo]|qkv|z|q_a|q_b|kv_a)"), "attention"),
         (re.compile(r"layers\.\d+\.(mlp|shared)\.(gate|up|down)"), "dense_mlp"),
         (re.compile(r"layers\.\d+\.experts\.\d+\.(gate|up|down)"), "expert")]


def role_spec(preset: Preset, name: str) -> QuantSpec | None:
    """How the preset stores the weight of canonical `name`, or None for a weight no preset quantizes."""
    role = next((r for pattern, r in ROLES if pattern.fullmatch(name)), None)
    return None if role is None else preset.spec(role)


def quantizer(preset_name: str) -> Quantizer:
    """(canonical name, weight) -> the weight as the preset stores its role, for the loader to apply to each
    tensor as it is read (offload.loader.streamed_weights)."""
    preset = get_preset(preset_name)

    def quantize(name: str, weight):
        spec = role_spec(preset, name)
        return weight if spec is None or isinstance(weight, QuantizedTensor) else spec.quantize(weight, name=name)

    return quantize


def prepared(weights: dict) -> ExpertWeights:
    """Compute-ready forms (e.g. torch int4pack on CPU) of the quantized entries, converted once."""
    return ExpertWeights((k, prepare(v) if isinstance(v, QuantizedTensor) else v) for k, v in weights.items())
