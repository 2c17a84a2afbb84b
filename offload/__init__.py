"""moe-offload: run Mixture-of-Experts LLMs larger than your GPU by streaming experts from CPU RAM."""
from __future__ import annotations

from pathlib import Path

import torch

from .engine.resident import ResidentExperts
from .errors import CheckpointError, ModelFormatError, OffloadError
from .lm import MoEModel
from .loader import checkpoint_dtype, load_spec, load_weights
from .model.decoder import Decoder

__all__ = ["load", "MoEModel", "OffloadError", "ModelFormatError", "CheckpointError"]


def _device(device: str | torch.device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load(source: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> MoEModel:
    """Load a model from a local directory (config.json + *.safetensors + tokenizer) or a hub repo id.

    Tensors stream one at a time into the runtime's layout; every expert stays resident on `device`.
    """
    path, config, spec, adapter = load_spec(source)
    dev = _device(device)
    dtype = dtype or checkpoint_dtype(config)
    weights = load_weights(path, spec, adapter, dtype, dev)
    decoder = Decoder(spec, weights.dense, ResidentExperts(dict(weights.experts)), dev, dtype)
    return MoEModel(decoder, spec, path, weights.mtp)
