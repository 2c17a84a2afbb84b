"""One contiguous, 256-byte-aligned uint8 blob per expert, so moving an expert is one copy.

Layout: 8-byte magic, uint32 little-endian header length, UTF-8 JSON header (index), then
each tensor at a 256-aligned offset. unpack_expert returns views into the blob.
The layout is canonical (entries and a quantized entry's tensors sorted by name, JSON keys sorted), so
experts with like tensors get byte-identical headers whatever order a checkpoint listed them in.
"""
from __future__ import annotations

import json
import struct
from typing import Any, Mapping

import torch
from offload.quant.tensor import QuantizedTensor

MAGIC = b"MOEXPB01"
ALIGN = 256
Entry = QuantizedTensor | torch.Tensor


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"expert blob names unknown dtype {name!r}")
    return dt


def pack_expert(entries: Mapping[str, Entry]) -> torch.Tensor:
    """Pack named weights (quantized or dense) into one uint8 blob on their device, in the canonical order
    (sorted by name): the store reads every expert with one index, so the input order must not matter."""
    index: dict[str, Any] = {}
    parts: list[tuple[int, torch.Tensor]] = []
    offset = 0
    for name, e in sorted(entries.items()):
        qt = e if isinstance(e, QuantizedTensor) else None
        tensors = qt.tensors if qt else {"data": e}
        slots = {}
        for key, t in sorted(tensors.items()):
            slots[key] = [str(t.dtype).removeprefix("torch."), list(t.shape), offset]
            parts.append((offset, t))
            offset = _align(offset + t.numel() * t.element_size())
        index[name] = {"fmt": qt.fmt if qt else "dense", "shape": list(qt.shape if qt else e.shape),
                       "params": qt.params if qt else {}, "tensors": slots}
    header = json.dumps({"entries": index}, separators=(",", ":"), sort_keys=True).encode()
    base = _align(len(MAGIC) + 4 + len(header))
    device = parts[0][1].device if parts else torch.device("cpu")
    raw = torch.zeros(base + offset + ALIGN, dtype=torch.uint8, device=device)
    start = -raw.data_ptr() % ALIGN  # the blob itself starts on a 256-byte boundary
    blob = raw[start: start + base + offset]
    blob[: base].copy_(torch.frombuffer(bytearray(MAGIC + struct.pack("<I", len(header)) + header
                                                  + bytes(base - len(MAGIC) - 4 - len(header))), dtype=torch.uint8))
    for off, t in parts:
        nb = t.numel() * t.element_size()
        blob[base + off: base + off + nb].view(t.dtype).copy_(t.reshape(-1))
    return blob


def read_index(blob: torch.Tensor) -> dict[str, Any]:
    """Parse a blob's header (a few KB copied to the host); reusable for same-layout blobs."""
    head = bytes(blob[: len(MAGIC) + 4].cpu().tolist())
    if head[: len(MAGIC)] != MAGIC:
        raise ValueError("not an expert blob (bad magic); was it written by offload.quant.pack_expert?")
    (length,) = struct.unpack("<I", head[len(MAGIC):])
    start = len(MAGIC) + 4
    index = json.loads(bytes(blob[start: start + length].cpu().tolist()))
    index["base"] = _align(start + length)
    return index


def unpack_expert(blob: torch.Tensor, index: dict[str, Any] | None = None) -> dict[str, Entry]:
    """Views into `blob` (zero copy), on the blob's device."""
    index = index or read_index(blob)
    base, out = index["base"], {}
    for name, e in index["entries"].items():
        views = {}
        for key, (dt, shape, off) in e["tensors"].items():
            dtype = _dtype(dt)
            numel = 1
            for s in shape:
                numel *= s
            nb = numel * torch.empty((), dtype=dtype).element_size()
            views[key] = blob[base + off: base + off + nb].view(dtype).view(shape)
        out[name] = (views["data"] if e["fmt"] == "dense"
                     else QuantizedTensor(e["fmt"], tuple(e["shape"]), e["params"], views))
    return out
