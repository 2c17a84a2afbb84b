"""Host tier: every routed expert as ONE contiguous, 256-byte-aligned blob (offload.quant.pack format),
so moving an expert to the device is a single copy. Pinned on CUDA machines when the OS allows."""
from __future__ import annotations

import warnings

import torch

from offload.quant.pack import pack_expert, read_index, unpack_expert

ExpertWeights = dict[str, torch.Tensor]


def _pin(blob: torch.Tensor) -> torch.Tensor:
    try:
        return blob.pin_memory()
    except RuntimeError as e:  # e.g. WSL, or a locked-memory limit
        warnings.warn(f"pinning expert memory failed ({e}); using pageable memory (slower copies)", stacklevel=3)
        return blob


class HostStore:
    """(layer, expert) -> blob in host memory; all blobs share one layout (one parsed index). The blobs may
    be views of a memory-mapped packed checkpoint (offload.packed)."""

    def __init__(self, blobs: dict[tuple[int, int], torch.Tensor], pin: bool = False) -> None:
        self.pin = pin
        self.blobs = blobs
        self.index = read_index(next(iter(blobs.values())))
        self.blob_bytes = max(b.numel() for b in blobs.values())

    @classmethod
    def pack(cls, experts: dict[tuple[int, int], ExpertWeights], pin: bool = False) -> "HostStore":
        """Pack each expert's tensors into one blob (pinned on CUDA machines when allowed)."""
        blobs = {key: pack_expert(experts[key]) for key in sorted(experts)}
        return cls({key: _pin(b) for key, b in blobs.items()} if pin else blobs, pin)

    def new_blob(self) -> torch.Tensor:
        """Host memory for one expert coming back from the device (exclusive placement)."""
        blob = torch.empty(self.blob_bytes, dtype=torch.uint8)
        return _pin(blob) if self.pin else blob

    def view(self, blob: torch.Tensor) -> ExpertWeights:
        """The expert's tensors as views into `blob` (host blob or a device slot)."""
        return unpack_expert(blob, self.index)
