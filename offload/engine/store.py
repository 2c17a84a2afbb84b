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
    """(layer, expert) -> blob in host memory; all blobs share one layout (one parsed index)."""

    def __init__(self, experts: dict[tuple[int, int], ExpertWeights], pin: bool = False) -> None:
        self.pin = pin
        self.blobs: dict[tuple[int, int], torch.Tensor] = {}
        for key in sorted(experts):
            blob = pack_expert(experts[key])
            self.blobs[key] = _pin(blob) if pin else blob
        first = next(iter(self.blobs.values()))
        self.index = read_index(first)
        self.blob_bytes = max(b.numel() for b in self.blobs.values())

    def new_blob(self) -> torch.Tensor:
        """Host memory for one expert coming back from the device (exclusive placement)."""
        blob = torch.empty(self.blob_bytes, dtype=torch.uint8)
        return _pin(blob) if self.pin else blob

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b in self.blobs.values())

    def view(self, blob: torch.Tensor) -> ExpertWeights:
        """The expert's tensors as views into `blob` (host blob or a device slot)."""
        return unpack_expert(blob, self.index)
