"""Build a model from a checkpoint directory: config -> spec -> streamed, converted, checked weights."""
from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from offload.quant import QuantizedTensor

from .archs import read_spec
from .archs.base import LAYER, ReadTensor
from .checkpoint import TensorStream, read_config, resolve
from .errors import CheckpointError, ModelFormatError
from .memory import Trimmer
from .spec import ModelSpec

Progress = Callable[[str, int, int], None]  # (stage, done, total): reported during the slow stages of a load

EXPERT = re.compile(r"layers\.(\d+)\.experts\.(\d+)\.(\w+)")
FP32_ALWAYS = ("router.correction_bias",)  # selection-only bias: transformers keeps it in fp32 too
QUANTIZE_GARBAGE = 4  # hqq's optimizer frees a few fp32 temporaries of each weight it quantizes (Trimmer)
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the model can compute in


def checkpoint_dtype(config: dict) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, name.replace("torch.", ""), None) if isinstance(name, str) else None
    if dtype not in COMPUTE_DTYPES:
        raise ModelFormatError(f"config.json dtype {name!r} is not a dtype the model can compute in; "
                               "set it to 'bfloat16', 'float16' or 'float32'")
    return dtype


class LoadedWeights:
    """Non-expert weights by canonical name, routed experts by (layer, expert), and MTP tensors."""

    def __init__(self) -> None:
        self.dense: dict[str, torch.Tensor] = {}
        self.experts: dict[tuple[int, int], object] = {}  # {matrix: tensor}, or the form load_weights was asked for
        self.mtp: dict[str, torch.Tensor] = {}


def place(tensor, dtype: torch.dtype, device: torch.device, keep_quantized: bool):
    """A checkpoint-quantized tensor (gpt-oss MXFP4) stays quantized only when a preset will run on it."""
    if isinstance(tensor, QuantizedTensor):
        return tensor.to(device) if keep_quantized else tensor.dequantize(dtype).to(device)
    return tensor.to(device=device, dtype=dtype)


def _mtp_alias(name: str, spec: ModelSpec, adapter) -> str:
    """DeepSeek-V3 and GLM-4.5 publish their MTP layers as decoder layers numbered from num_hidden_layers on
    (`mtp_after_decoder` adapters): those are read as `model.mtp.layers.{k}.*`, MiMo's name for them."""
    m = LAYER.fullmatch(name) if getattr(adapter, "mtp_after_decoder", False) else None
    if m is None or int(m[1]) < len(spec.layers):
        return name
    return f"model.mtp.layers.{int(m[1]) - len(spec.layers)}.{m[2]}"


def converted(stream: Iterable[tuple[Path, str]], read: ReadTensor, spec: ModelSpec, adapter,
              where: str | Path = "checkpoint") -> Iterator[tuple[Path, str, str, torch.Tensor]]:
    """(file, checkpoint name, canonical name, tensor) of every tensor the model uses, shape-checked; MTP tensors
    come as `mtp.*`. Every checkpoint tensor must be used, read along with another (MXFP4 or FP8 scales) or match
    the architecture's `ignored` patterns: any other one means config.json describes another model (fewer
    layers, no biases, tied embeddings...), which would silently compute something else."""
    expected = spec.expected_shapes()
    ignored = re.compile("|".join(adapter.ignored))
    names, read_names, unused = [], set(), []

    def reading(name: str) -> torch.Tensor:
        read_names.update((name, name + "_scale_inv"))  # FP8 block scales are read with their weight
        return read(name)

    mtp_layers: dict[str, list[str]] = {}  # decoder layers past num_hidden_layers read as MTP layers -> names
    for file, name in stream:
        names.append(name)
        alias = _mtp_alias(name, spec, adapter)
        if alias != name:
            mtp_layers.setdefault(alias.split(".")[3], []).append(alias)
        for canonical, tensor in adapter.convert(alias, lambda n: reading(name if n == alias else n)):
            if not canonical.startswith("mtp.") and canonical not in expected:
                unused.append(name)
                break
            shape = expected.get(canonical)
            if shape is not None and tuple(tensor.shape) != shape:
                raise CheckpointError(
                    f"{file.name}: tensor {name!r} has shape {tuple(tensor.shape)} but config.json implies "
                    f"{shape}; the checkpoint does not match its config.json: re-export them together")
            if not isinstance(tensor, QuantizedTensor) and not tensor.is_floating_point():
                dtype = str(tensor.dtype).removeprefix("torch.")
                raise CheckpointError(f"{file.name}: tensor {name!r} is {dtype}, not a floating-point type; the file's "
                                      "header was altered or damaged: re-download or re-save the checkpoint")
            yield file, name, canonical, tensor
    unused += [n for n in names if n not in read_names and not ignored.fullmatch(n)]
    # an MTP layer has its eh_proj; a decoder layer without one is one config.json's num_hidden_layers left out
    unused += [n.replace(f"model.mtp.layers.{k}.", f"model.layers.{len(spec.layers) + int(k)}.")
               for k, group in mtp_layers.items() if f"model.mtp.layers.{k}.eh_proj.weight" not in group for n in group]
    if unused:
        unused = sorted(set(unused))
        raise CheckpointError(
            f"{where}: the checkpoint holds {len(unused)} tensor(s) config.json does not describe, e.g. {unused[:3]}; "
            "config.json belongs to another model (num_hidden_layers, layer kinds, biases, tie_word_embeddings?): "
            "re-export config.json and the weights together")


Quantizer = Callable[[str, object], object]  # (canonical name, placed tensor) -> what the model keeps


def _expert_roles(spec: ModelSpec) -> dict[tuple[int, int], set[str]]:
    """(layer, expert) -> the matrices that complete it."""
    roles: dict[tuple[int, int], set[str]] = defaultdict(set)
    for name in spec.expected_shapes():
        if m := EXPERT.fullmatch(name):
            roles[int(m[1]), int(m[2])].add(m[3])
    return roles


def streamed_weights(path: Path, spec: ModelSpec, adapter, dtype: torch.dtype, device: torch.device,
                     keep_quantized: bool = False, quantize: Quantizer | None = None,
                     progress: Progress | None = None, stage: str = "reading weights") -> Iterator[tuple]:
    """("dense", name, tensor) and ("mtp", name, tensor as read) as each is read, and ("expert", (layer, expert),
    {matrix: tensor}) once all of an expert's matrices are, each converted (and quantized) as it arrives: a load
    holds what it keeps plus one checkpoint tensor and one expert, never a 16-bit copy of a model it keeps
    quantized; the heap is trimmed as it goes (offload.memory.Trimmer). Raises CheckpointError at the end when a
    tensor config.json requires is missing (progress: per checkpoint tensor)."""
    roles, partial, seen, trimmer = _expert_roles(spec), {}, set(), Trimmer()
    with TensorStream(path) as stream:  # closes the shards even when a check below raises
        def reported() -> Iterator[tuple[Path, str]]:
            for done, item in enumerate(stream):
                if progress:
                    progress(stage, done, len(stream))
                yield item

        for _, _, canonical, tensor in converted(reported(), stream.read, spec, adapter, path):
            if canonical.startswith("mtp."):  # as read: the loader and the converter store them differently
                yield "mtp", canonical[4:], tensor
                continue
            target = torch.float32 if canonical.endswith(FP32_ALWAYS) else dtype
            tensor = place(tensor, target, device, keep_quantized)
            trimmer.read(tensor.nbytes * (QUANTIZE_GARBAGE if quantize is not None else 1))
            if quantize is not None:
                tensor = quantize(canonical, tensor)
            seen.add(canonical)
            if not (m := EXPERT.fullmatch(canonical)):
                yield "dense", canonical, tensor
                continue
            key = (int(m[1]), int(m[2]))
            partial.setdefault(key, {})[m[3]] = tensor
            if set(partial[key]) == roles[key]:
                yield "expert", key, partial.pop(key)
        if progress:
            progress(stage, len(stream), len(stream))
    missing = [k for k in spec.expected_shapes() if k not in seen]
    if missing:
        raise CheckpointError(
            f"{path}: checkpoint lacks {len(missing)} tensor(s) config.json requires, e.g. {missing[:3]}; "
            "a shard is missing or the checkpoint belongs to another config: re-download it")


def load_weights(path: Path, spec: ModelSpec, adapter, dtype: torch.dtype, device: torch.device,
                 keep_quantized: bool = False, progress: Progress | None = None, quantize: Quantizer | None = None,
                 stage: str = "reading weights", expert_form: Callable[[dict], object] | None = None
                 ) -> LoadedWeights:
    """Every weight, streamed (streamed_weights); each expert kept as `expert_form` makes it (e.g. one packed blob
    for the host store: packed as it completes, so its separate tensors are never all held with the blobs)."""
    out = LoadedWeights()
    for kind, key, value in streamed_weights(path, spec, adapter, dtype, device, keep_quantized, quantize,
                                             progress, stage):
        if kind == "expert":
            out.experts[key] = expert_form(value) if expert_form else value
        elif kind == "mtp":
            out.mtp[key] = value.to(device=device, dtype=dtype)
        else:
            out.dense[key] = value
    return out


def generation_eos(path: Path, spec: ModelSpec) -> list[int]:
    """The EOS ids generate stops at: generation_config.json's (read first, as transformers' generate does), else
    config.json's; a file that is not JSON, or ids outside the vocabulary, are refused at load."""
    file = path / "generation_config.json"
    try:
        gen = json.loads(file.read_text()) if file.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{file} is not valid JSON ({e}); re-export it, or delete it") from None
    if not isinstance(gen, dict):
        raise ModelFormatError(f"{file} holds a JSON {type(gen).__name__}, not an object; re-export it, or delete it")
    eos = gen.get("eos_token_id", list(spec.eos_token_ids))
    ids = [] if eos is None else eos if isinstance(eos, list) else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < spec.vocab_size for i in ids):
        raise ModelFormatError(f"{file} has eos_token_id={eos!r}, but it must be a token id (or a list of them) in "
                               f"[0, vocab_size={spec.vocab_size}); correct it, or delete the file")
    return ids


def load_spec(source: str | Path) -> tuple[Path, dict, ModelSpec, object]:
    path = resolve(source)
    config = read_config(path)
    adapter, spec = read_spec(config)
    return path, config, spec, adapter
