"""The packed checkpoint `offload-convert` writes: the model's own config and tokenizer files, the
non-expert weights under canonical names in dense.safetensors, and every routed expert as one aligned
blob in experts.bin (indexed by experts.json). The expert file is memory-mapped at load, so a model
larger than RAM still runs: the OS pages experts in from disk as they are used."""
from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from offload.quant.pack import pack_expert

from .checkpoint import TensorStream
from .errors import CheckpointError
from .loader import EXPERT, FP32_ALWAYS, checkpoint_dtype, load_spec

INDEX, BLOBS, DENSE = "experts.json", "experts.bin", "dense.safetensors"
PAGE = 4096  # blobs start on page boundaries: a blob maps to whole pages
SIDECAR_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "chat_template.jinja", "tokenizer.model", "predictor.safetensors")


def is_packed(path: Path) -> bool:
    return (path / INDEX).is_file()


def convert(source: str | Path, dest: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Stream a checkpoint into the packed layout; written under a temporary name, then renamed."""
    path, config, spec, adapter = load_spec(source)
    dtype = dtype or checkpoint_dtype(config)
    dest = Path(dest)
    if dest.exists():
        raise FileExistsError(f"{dest} already exists; choose a new output directory")
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir(parents=True)
    try:
        for name in SIDECAR_FILES:
            if (path / name).is_file():
                shutil.copy2(path / name, tmp / name)
        _write(path, spec, adapter, dtype, tmp)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _write(path: Path, spec, adapter, dtype: torch.dtype, out: Path) -> None:
    expected = spec.expected_shapes()
    roles_per_expert = {}
    for name in expected:
        if m := EXPERT.fullmatch(name):
            roles_per_expert.setdefault((int(m[1]), int(m[2])), set()).add(m[3])
    dense, partial, index, offset = {}, {}, {}, 0
    with TensorStream(path) as stream, open(out / BLOBS, "wb") as blobs:
        for file, name in stream:
            for canonical, tensor in adapter.convert(name, stream.read):
                shape = expected.get(canonical)
                if shape is None:
                    continue
                if tuple(tensor.shape) != shape:
                    raise CheckpointError(f"{file.name}: tensor {name!r} has shape {tuple(tensor.shape)} but "
                                          f"config.json implies {shape}; re-export the checkpoint with its config")
                tensor = tensor.to(torch.float32 if canonical.endswith(FP32_ALWAYS) else dtype)
                if not (m := EXPERT.fullmatch(canonical)):
                    dense[canonical] = tensor.contiguous()
                    continue
                key = (int(m[1]), int(m[2]))
                partial.setdefault(key, {})[m[3]] = tensor
                if set(partial[key]) == roles_per_expert[key]:  # complete: pack it and free it
                    blob = pack_expert(partial.pop(key))
                    blobs.write(bytes(blob.numpy()))
                    index[f"{key[0]}/{key[1]}"] = [offset, blob.numel()]
                    offset += blob.numel()
                    pad = -offset % PAGE
                    blobs.write(bytes(pad))
                    offset += pad
    missing = [k for k in expected if not EXPERT.fullmatch(k) and k not in dense] + sorted(map(str, partial))
    if missing or len(index) != len(roles_per_expert):
        raise CheckpointError(f"{path}: checkpoint lacks tensors config.json requires, e.g. {missing[:3]}; "
                              "re-download it")
    save_file(dense, out / DENSE, metadata={"format": "pt"})
    (out / INDEX).write_text(json.dumps({"format": 1, "dtype": str(dtype).removeprefix("torch."),
                                         "experts": index}))


def read_packed(path: Path, device: torch.device) -> tuple[dict[str, torch.Tensor], dict, np.memmap]:
    """(dense weights on `device`, the expert index, the memory-mapped expert file)."""
    meta = json.loads((path / INDEX).read_text())
    dense = {k: v.to(device) for k, v in load_file(path / DENSE).items()}
    return dense, meta, np.memmap(path / BLOBS, dtype=np.uint8, mode="r")


def mapped_blobs(meta: dict, mapped: np.memmap) -> dict[tuple[int, int], torch.Tensor]:
    """Zero-copy uint8 views of every expert blob in the mapped file (read-only)."""
    with warnings.catch_warnings():  # read-only mapping: we never write through these views
        warnings.simplefilter("ignore", UserWarning)
        whole = torch.from_numpy(mapped)
    out = {}
    for key, (offset, nbytes) in meta["experts"].items():
        layer, expert = map(int, key.split("/"))
        out[layer, expert] = whole[offset: offset + nbytes]
    return out
