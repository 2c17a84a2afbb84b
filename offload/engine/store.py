"""Host tier: every routed expert as ONE contiguous, 256-byte-aligned blob (offload.quant.pack format),
so moving an expert to the device is a single copy. Pinned on CUDA machines when the OS allows."""
from __future__ import annotations

import warnings
from collections.abc import Iterator, MutableMapping
from typing import Any, Protocol

import torch

from offload.quant.pack import pack_expert, read_index, unpack_expert

from ..errors import CheckpointError

ExpertWeights = dict[str, torch.Tensor]


def _pin(blob: torch.Tensor) -> torch.Tensor:
    try:
        return blob.pin_memory()
    except RuntimeError as e:  # e.g. WSL, or a locked-memory limit
        warnings.warn(f"pinning expert memory failed ({e}); using pageable memory (slower copies)", stacklevel=3)
        return blob


def _describe(entry: dict[str, Any]) -> str:
    return entry["fmt"] + " " + ", ".join(f"{key} {dt}{shape} at {off}" for key, (dt, shape, off)
                                          in entry["tensors"].items())


def _difference(index: dict[str, Any], blob: torch.Tensor) -> str:
    """How `blob`'s header differs from `index`, in a few words (it may not be a header at all)."""
    try:
        other = read_index(blob)
    except ValueError as e:
        return str(e)
    want, got = index["entries"], other["entries"]
    if list(got) != list(want):
        return f"entries {list(got)} instead of {list(want)}"
    for name in want:
        if got[name] != want[name]:
            return f"{name!r} is {_describe(got[name])} instead of {_describe(want[name])}"
    return "its header bytes differ"


class BlobSource(Protocol):
    """Where a store's blobs live when they are not its own memory (offload.packed maps them from a file)."""

    def verify(self, key: tuple[int, int], blob: torch.Tensor) -> None:
        """Raise unless `blob` holds the bytes it was written with (called once, before its first use)."""

    def check(self) -> None:
        """Raise if the blobs may have changed since they were opened."""

    def release(self, blob: torch.Tensor) -> None:
        """`blob` was copied and will not be read again: its pages need not stay in this process."""


class _VerifiedBlobs(MutableMapping):
    """(layer, expert) -> blob, each verified by its source when first handed out: checking every blob at load
    would read a whole model larger than RAM from disk. Blobs put in later (written back from the device) are
    the store's own memory and need no check."""

    def __init__(self, blobs: dict[tuple[int, int], torch.Tensor], source: BlobSource) -> None:
        self._blobs, self._source, self._unverified = blobs, source, set(blobs)

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
        blob = self._blobs[key]
        if key in self._unverified:
            self._source.verify(key, blob)
            self._unverified.discard(key)
        return blob

    def __setitem__(self, key: tuple[int, int], blob: torch.Tensor) -> None:
        self._blobs[key] = blob
        self._unverified.discard(key)

    def __delitem__(self, key: tuple[int, int]) -> None:
        del self._blobs[key]
        self._unverified.discard(key)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self._blobs)

    def __len__(self) -> int:
        return len(self._blobs)


class HostStore:
    """(layer, expert) -> blob in host memory; all blobs share one layout (one parsed index), which is checked:
    a blob read with another blob's index would silently mix up its tensors. The blobs may be views of a
    memory-mapped packed checkpoint (offload.packed, the `source`): then each is verified before its first use,
    and `check()` tells whether the file is still the one mapped."""

    def __init__(self, blobs: dict[tuple[int, int], torch.Tensor], pin: bool = False,
                 source: BlobSource | None = None) -> None:
        self.pin, self.source = pin, source
        first, blob = next(iter(blobs.items()))
        self.index = read_index(blob)
        self._check_layouts(blobs, first, blob[: self.index["base"]])
        self.blob_bytes = max(b.numel() for b in blobs.values())
        self.blobs = blobs if source is None else _VerifiedBlobs(blobs, source)

    def _check_layouts(self, blobs: dict[tuple[int, int], torch.Tensor], first: tuple[int, int],
                       header: torch.Tensor) -> None:
        """Every blob's header bytes equal the first's (a few hundred bytes each, also from a mapped file)."""
        for (layer, expert), blob in blobs.items():
            if not torch.equal(blob[: header.numel()], header):
                raise CheckpointError(
                    f"expert blob (layer {layer}, expert {expert}) is laid out unlike (layer {first[0]}, expert "
                    f"{first[1]})'s: {_difference(self.index, blob)}; read with the shared layout its "
                    "tensors would be mixed up: re-convert the checkpoint with offload-convert (experts packed by "
                    "hand need the same tensors, dtypes and shapes)")

    @staticmethod
    def blob(expert: ExpertWeights, pin: bool = False) -> torch.Tensor:
        """One expert's tensors packed into its blob (pinned when asked and allowed)."""
        blob = pack_expert(expert)
        return _pin(blob) if pin else blob

    @classmethod
    def pack(cls, experts: dict[tuple[int, int], ExpertWeights], pin: bool = False) -> "HostStore":
        """Pack each expert's tensors into one blob (pinned on CUDA machines when allowed)."""
        return cls({key: cls.blob(experts[key], pin) for key in sorted(experts)}, pin)

    def check(self) -> None:
        """Raise if the file the blobs are mapped from changed since it was opened (blobs in memory: never)."""
        if self.source is not None:
            self.source.check()

    def copies(self, device: torch.device) -> dict[tuple[int, int], ExpertWeights]:
        """Every expert's tensors on `device` in memory of their own (one verified blob copy each), for a model
        that keeps all experts resident: nothing it computes with is a view of a file that may change."""
        out = {}
        for key in self.blobs:  # one at a time: a mapped blob's pages are released once copied
            blob = self.blobs[key]
            out[key] = self.view(blob.to(device, copy=True))
            if self.source is not None:
                self.source.release(blob)
        return out

    def new_blob(self) -> torch.Tensor:
        """Host memory for one expert coming back from the device (exclusive placement)."""
        blob = torch.empty(self.blob_bytes, dtype=torch.uint8)
        return _pin(blob) if self.pin else blob

    def view(self, blob: torch.Tensor) -> ExpertWeights:
        """The expert's tensors as views into `blob` (host blob or a device slot)."""
        return unpack_expert(blob, self.index)
