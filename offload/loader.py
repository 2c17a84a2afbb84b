"""Build a model from a checkpoint directory: config -> spec -> streamed, converted, checked weights."""
from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

from offload.quant import QuantizedTensor

from .archs import adapter_for
from .checkpoint import TensorStream, read_config, resolve
from .errors import CheckpointError, ModelFormatError
from .spec import ModelSpec

Progress = Callable[[str, int, int], None]  # (stage, done, total): reported during the slow stages of a load

EXPERT = re.compile(r"layers\.(\d+)\.experts\.(\d+)\.(\w+)")
FP32_ALWAYS = ("router.correction_bias",)  # selection-only bias: transformers keeps it in fp32 too


def checkpoint_dtype(config: dict) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name).replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype):
        raise ModelFormatError(f"config.json dtype {name!r} is not a torch dtype; use e.g. 'bfloat16'")
    return dtype


class LoadedWeights:
    """Non-expert weights by canonical name, routed experts by (layer, expert), and MTP tensors."""

    def __init__(self) -> None:
        self.dense: dict[str, torch.Tensor] = {}
        self.experts: dict[tuple[int, int], dict[str, torch.Tensor]] = defaultdict(dict)
        self.mtp: dict[str, torch.Tensor] = {}


def _place(tensor, dtype: torch.dtype, device: torch.device, keep_quantized: bool):
    """A checkpoint-quantized tensor (gpt-oss MXFP4) stays quantized only when a preset will run on it."""
    if isinstance(tensor, QuantizedTensor):
        return tensor.to(device) if keep_quantized else tensor.dequantize(dtype).to(device)
    return tensor.to(device=device, dtype=dtype)


def load_weights(path: Path, spec: ModelSpec, adapter, dtype: torch.dtype, device: torch.device,
                 keep_quantized: bool = False, progress: Progress | None = None) -> LoadedWeights:
    """Stream, convert and check every tensor (progress: per checkpoint tensor)."""
    expected = spec.expected_shapes()
    out = LoadedWeights()
    seen: set[str] = set()
    with TensorStream(path) as stream:  # closes the shards even when a check below raises
        for done, (file, name) in enumerate(stream):
            if progress:
                progress("reading weights", done, len(stream))
            for canonical, tensor in adapter.convert(name, stream.read):
                if canonical.startswith("mtp."):
                    out.mtp[canonical[4:]] = tensor.to(device=device, dtype=dtype)
                    continue
                shape = expected.get(canonical)
                if shape is None:
                    continue  # a tensor this runtime does not use (e.g. rotary caches)
                if tuple(tensor.shape) != shape:
                    raise CheckpointError(
                        f"{file.name}: tensor {name!r} has shape {tuple(tensor.shape)} but config.json implies "
                        f"{shape}; the checkpoint does not match its config.json: re-export them together")
                target = torch.float32 if canonical.endswith(FP32_ALWAYS) else dtype
                tensor = _place(tensor, target, device, keep_quantized)
                seen.add(canonical)
                if m := EXPERT.fullmatch(canonical):
                    out.experts[int(m[1]), int(m[2])][m[3]] = tensor
                else:
                    out.dense[canonical] = tensor
        if progress:
            progress("reading weights", len(stream), len(stream))
    missing = [k for k in expected if k not in seen]
    if missing:
        raise CheckpointError(
            f"{path}: checkpoint lacks {len(missing)} tensor(s) config.json requires, e.g. {missing[:3]}; "
            "a shard is missing or the checkpoint belongs to another config: re-download it")
    return out


def load_spec(source: str | Path) -> tuple[Path, dict, ModelSpec, object]:
    path = resolve(source)
    config = read_config(path)
    adapter = adapter_for(config)
    return path, config, adapter.spec(config), adapter
