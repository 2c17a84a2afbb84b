"""Apply a quantization preset (offload.quant.PRESETS) to loaded weights, by role: attention projections,
dense MLPs, routed experts. Router, norms, embeddings and the LM head stay 16-bit; weights that arrive
quantized (gpt-oss MXFP4 experts) are kept as they are."""
from __future__ import annotations

import re

import torch

from offload.kernels import prepare
from offload.quant import QuantizedTensor, get_preset

from .loader import Progress

ROLES = [(re.compile(r"layers\.\d+\.attn\.[qkvo]"), "attention"), (re.compile(r"layers\.\d+\.mlp\.(gate|up|down)"),
                                                                   "dense_mlp")]
EXPERT_MATRICES = ("gate", "up", "down")


def quantize_weights(dense: dict[str, torch.Tensor], experts: dict[tuple[int, int], dict], preset_name: str,
                     progress: Progress | None = None) -> None:
    """In place: dense and expert matrices become QuantizedTensor per the preset (progress: per matrix)."""
    preset = get_preset(preset_name)
    jobs = []  # (where, key, spec, name)
    for name, w in dense.items():
        role = next((r for pattern, r in ROLES if pattern.fullmatch(name)), None)
        if role is not None and not isinstance(w, QuantizedTensor):
            jobs.append((dense, name, preset.spec(role), name))
    for (layer, expert), weights in experts.items():
        for role in EXPERT_MATRICES:
            if not isinstance(weights[role], QuantizedTensor):
                jobs.append((weights, role, preset.expert, f"layers.{layer}.experts.{expert}.{role}"))
    stage = f"quantizing ({preset_name})"
    for done, (where, key, spec, name) in enumerate(jobs):
        if progress:
            progress(stage, done, len(jobs))
        where[key] = spec.quantize(where[key], name=name)
    if progress:
        progress(stage, len(jobs), len(jobs))


def prepared(weights: dict) -> dict:
    """Compute-ready forms (e.g. torch int4pack on CPU) of the quantized entries, converted once."""
    return {k: prepare(v) if isinstance(v, QuantizedTensor) else v for k, v in weights.items()}
