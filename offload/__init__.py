"""moe-offload: run Mixture-of-Experts LLMs larger than your GPU by streaming experts from CPU RAM."""
from __future__ import annotations

from pathlib import Path

import torch

from .engine.offloaded import OffloadedExperts
from .engine.resident import ResidentExperts
from .engine.store import HostStore
from .errors import CheckpointError, ModelFormatError, OffloadError
from .lm import MoEModel
from .loader import checkpoint_dtype, load_spec, load_weights
from .model.decoder import Decoder

__all__ = ["load", "MoEModel", "OffloadError", "ModelFormatError", "CheckpointError"]


def _device(device: str | torch.device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load(source: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, *,
         cache_experts: int | None = None, prefetch: int = 1, policy: str = "lru") -> MoEModel:
    """Load a model from a local directory (config.json + *.safetensors + tokenizer) or a hub repo id.

    Tensors stream one at a time into the runtime's layout. `cache_experts=None` keeps every expert on
    `device`; an int k keeps the experts in host memory with k device slots per MoE layer, prefetching
    the predicted experts of the next `prefetch` MoE layers; `policy` names the eviction policy.
    """
    path, config, spec, adapter = load_spec(source)
    dev = _device(device)
    dtype = dtype or checkpoint_dtype(config)
    offloaded = cache_experts is not None and bool(spec.moe_layers)
    weights = load_weights(path, spec, adapter, dtype, torch.device("cpu") if offloaded else dev)
    if offloaded:
        store = HostStore(dict(weights.experts), pin=dev.type == "cuda")
        weights.experts.clear()
        experts = OffloadedExperts(store, spec.moe_layers, cache_experts, dev, policy)
        dense = {k: v.to(dev) for k, v in weights.dense.items()}
    else:
        experts, dense, prefetch = ResidentExperts(dict(weights.experts)), weights.dense, 0
    decoder = Decoder(spec, dense, experts, dev, dtype, prefetch=prefetch)
    return MoEModel(decoder, spec, path, {k: v.to(dev) for k, v in weights.mtp.items()})
