"""moe-offload: run Mixture-of-Experts LLMs larger than your GPU by streaming experts from CPU RAM.

`import offload` stays light (no torch): `load` and `MoEModel` are imported on first use, so a command's
--help, or a program that only names the package, does not pay for torch, tokenizers or hqq.
"""
from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from .errors import CheckpointError, ModelFormatError, OffloadError

if TYPE_CHECKING:
    from .lm import MoEModel
    from .loading import load

_LAZY = {"load": "offload.loading", "MoEModel": "offload.lm"}
__all__ = ["load", "MoEModel", "OffloadError", "ModelFormatError", "CheckpointError"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'offload' has no attribute {name!r}")
    value = getattr(import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
