"""One contiguous, 256-byte-aligned uint8 blob per expert, so moving an expert is one copy.

Layout: 8-byte magic, uint32 little-endian header length, UTF-8 JSON header (index), then
each tensor at a 256-aligned offset. unpack_expert returns views into the blob.
The layout is canonical (entries and a quantized entry's tensors sorted by name, JSON keys sorted), so
experts with like tensors get byte-identical headers whatever order a checkpoint listed them in.
"""
from __future__ import annotations

import json
import math
import struct
from typing import Any, Mapping

import torch
from offload.quant.tensor import QuantizedTensor

MAGIC = b"MOEXPB01"
ALIGN = 256
MAX_HEADER = 1 << 20  # a header is a few KB; a longer claimed length is damage
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


def _dims(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in value)


def _check_entries(index: dict[str, Any], room: int) -> int:
    """Every entry well formed, every tensor a known dtype whose bytes lie in the `room` bytes after the header;
    returns where the data ends (a blob pack_expert writes is exactly base + that long)."""
    entries = index.get("entries")
    if not isinstance(entries, dict):
        raise ValueError("its header has no 'entries' object")
    end = 0
    for name, e in entries.items():
        if not (isinstance(e, dict) and isinstance(e.get("fmt"), str) and _dims(e.get("shape"))
                and isinstance(e.get("params"), dict) and isinstance(e.get("tensors"), dict)
                and (e["fmt"] != "dense" or list(e["tensors"]) == ["data"])):
            raise ValueError(f"its entry {name!r} is malformed")
        for key, t in e["tensors"].items():
            if not (isinstance(t, list) and len(t) == 3 and isinstance(t[0], str) and _dims(t[1]) and _dims([t[2]])
                    and t[2] % ALIGN == 0):
                raise ValueError(f"its tensor {name}.{key} is malformed")
            stop = t[2] + math.prod(t[1]) * _dtype(t[0]).itemsize
            if stop > room:
                raise ValueError(f"its tensor {name}.{key} ends {stop - room} bytes past the end of the blob")
            end = max(end, _align(stop))
    return end


def read_index(blob: torch.Tensor) -> dict[str, Any]:
    """Parse and check a blob's header (a few KB copied to the host); reusable for same-layout blobs. Raises
    ValueError for a header pack_expert would not write, or one naming bytes outside the blob; the result's
    "base" is where the tensor data starts, "size" the blob size its layout implies."""
    start = len(MAGIC) + 4
    head = blob[:start].cpu().numpy().tobytes()
    if len(head) < start or head[: len(MAGIC)] != MAGIC:
        raise ValueError("not an expert blob (too short, or a bad magic); was it written by offload.quant.pack_expert?")
    (length,) = struct.unpack("<I", head[len(MAGIC):])
    if length > min(MAX_HEADER, blob.numel() - start):
        raise ValueError(f"its header length {length} does not fit the blob ({blob.numel()} bytes)")
    try:
        index = json.loads(blob[start: start + length].cpu().numpy().tobytes())
    except (ValueError, RecursionError) as e:  # not UTF-8 or not JSON
        raise ValueError(f"its header is not JSON ({e})") from None
    if not isinstance(index, dict):
        raise ValueError("its header is not a JSON object")
    index["base"] = _align(start + length)
    index["size"] = index["base"] + _check_entries(index, blob.numel() - index["base"])
    return index


def unpack_expert(blob: torch.Tensor, index: dict[str, Any] | None = None) -> dict[str, Entry]:
    """Views into `blob` (zero copy), on the blob's device. Blobs of one layout stacked as rows [S, bytes] give
    each dense weight as one [S, ...] view (unpack_rows)."""
    index = index or read_index(blob)
    base, lead, out = index["base"], blob.shape[:-1], {}
    for name, e in index["entries"].items():
        views = {}
        for key, (dt, shape, off) in e["tensors"].items():
            dtype = _dtype(dt)
            nb = math.prod(shape) * dtype.itemsize
            views[key] = blob[..., base + off: base + off + nb].view(dtype).view(*lead, *shape)
        out[name] = (views["data"] if e["fmt"] == "dense"
                     else QuantizedTensor(e["fmt"], tuple(e["shape"]), e["params"], views))
    return out


def unpack_rows(rows: torch.Tensor, index: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """Blobs of one layout stacked as rows [S, bytes] (a layer's device slots) -> each weight as one [S, ...]
    view, for products that gather experts by row; None when a weight is quantized (its parts are not one
    tensor such a product reads)."""
    if any(e["fmt"] != "dense" for e in index["entries"].values()):
        return None
    return unpack_expert(rows, index)
