"""Find and stream a checkpoint: config.json, safetensors shards (optionally indexed), tokenizer files.

Tensors are read one at a time with safetensors' `safe_open`, one shard open at a time, so loading
never holds more than the converted weights plus one shard's mapped pages.
"""
from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from offload.quant import dequantize_fp8_blocks

from .errors import CheckpointError, ModelFormatError
from .model.predictor import FILENAME as PREDICTOR  # prefetch maps kept beside the weights, not weights

INDEX_FILE = "model.safetensors.index.json"
DEMO_DIR = Path(__file__).parent / "demo"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.txt"]


def resolve(source: str | Path) -> Path:
    """A local model directory, or a hub repo id fetched with huggingface_hub (weights + tokenizer only)."""
    if str(source) == "demo":
        if not (DEMO_DIR / "config.json").is_file():
            raise ModelFormatError(f"the bundled demo model is missing from {DEMO_DIR}; reinstall moe-offload "
                                   "or pass --model with a model directory")
        return DEMO_DIR
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    text = str(source)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise ModelFormatError(f"{text}: no such model directory; pass a directory holding config.json and "
                               "*.safetensors, or a hub repo id like 'org/name'")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # offline, unknown/gated repo, network: hub errors are many types and multi-line
        reason = (str(e).strip().splitlines() or [""])[0]
        raise ModelFormatError(f"{text}: no such local directory, and hub repo {text!r} could not be fetched "
                               f"({type(e).__name__}: {reason}); check the path, or the repo id and your "
                               "network / HF_HUB_OFFLINE setting") from e


def read_config(path: Path) -> dict:
    file = path / "config.json"
    if not file.is_file():
        raise ModelFormatError(f"{path} has no config.json; point offload.load at a model directory "
                               "(config.json + *.safetensors) or a hub repo id")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ModelFormatError(f"{file} is not valid JSON ({e}); re-export the model's config") from None


def reason(error: BaseException) -> str:
    """An exception's message on one line: safetensors' errors quote the header they could not parse, newlines
    and all."""
    return " ".join(str(error).split())[:300]


def regular_file(file: Path, fix: str) -> Path:
    """`file` if it is, or links to, a regular file; a FIFO or device would block a read or never end it."""
    try:
        mode = os.stat(file).st_mode
    except OSError as e:  # missing, a dangling link, a name too long, no permission
        raise CheckpointError(f"{file}: {e.strerror or e}; {fix}") from None
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{file} is not a regular file (a folder, FIFO or device); {fix}")
    return file


def _plain_name(name: str) -> bool:
    """A file name without folders, and printable: a newline in it would split any message that names it."""
    return name not in ("", ".", "..") and name.isprintable() and "/" not in name and "\\" not in name


def _indexed_shards(index: Path) -> list[str]:
    """The shard names an index maps tensors to. Each must be a plain file name, checked before any is looked up,
    so that no error tells whether a file outside the model directory exists."""
    fix = "re-download or re-save the checkpoint"
    try:
        document = json.loads(regular_file(index, fix).read_bytes())
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, nested too deep
        raise CheckpointError(f"{index} is not valid JSON ({type(e).__name__}); {fix}") from None
    weight_map = document.get("weight_map") if isinstance(document, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index} is malformed: it needs a \"weight_map\" object of tensor name -> shard file "
                              f"name; {fix}")
    names = sorted(set(weight_map.values()))
    bad = next((n for n in names if not _plain_name(n)), None)
    if bad is not None:
        raise CheckpointError(f"{index} names shard {bad[:200]!r}, which is not a plain file name: shards must lie in "
                              f"the model directory itself; {fix}")
    return names


def shard_files(path: Path) -> list[Path]:
    """The shards in the order to read them: those the index names, else every *.safetensors file; each a
    regular file (or a link to one: a Hugging Face cache snapshot links every file into its blobs folder)."""
    index = path / INDEX_FILE
    if os.path.lexists(index):
        files = [path / name for name in _indexed_shards(index)]
        fix = f"{index.name} names it: download the missing shard(s), or re-save the checkpoint"
    else:
        files = sorted(f for f in path.glob("*.safetensors") if f.name != PREDICTOR)
        fix = "remove it, or re-save the checkpoint"
        if not files:
            raise CheckpointError(f"{path} has no *.safetensors files; offload reads safetensors checkpoints only "
                                  "(convert .bin weights with transformers' save_pretrained)")
    return [regular_file(file, fix) for file in files]


def open_shard(file: Path):
    """safe_open reading tensors into memory they own (pread): with the default mmap backend (safetensors >=0.8)
    every loaded weight stays a view of the file, so rewriting the checkpoint in place changes a loaded model
    and truncating it kills the process with SIGBUS."""
    try:
        return safe_open(str(file), framework="pt", backend="pread")
    except TypeError:  # safetensors < 0.8: no backend argument
        return safe_open(str(file), framework="pt")


class TensorStream:
    """Yields (file, name) for every tensor, shard by shard; `read(name)` reads any tensor of the checkpoint."""

    def __init__(self, path: Path) -> None:
        self.files = shard_files(path)
        self._stack = ExitStack()
        self._open: dict[Path, object] = {}
        self._where: dict[str, Path] = {}

    def close(self) -> None:
        """Unmap every shard now (a failed load must not keep files mapped through its traceback)."""
        self._close_all()

    def __enter__(self) -> "TensorStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _handle(self, file: Path):
        if file not in self._open:
            try:
                self._open[file] = self._stack.enter_context(open_shard(file))
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{file}: cannot read it as safetensors ({reason(e)}); the file is truncated or "
                                      "corrupt: re-download or re-save it") from None
        return self._open[file]

    def _index_all(self) -> None:
        for file in self.files:
            for name in self._handle(file).keys():
                if name in self._where:  # which copy a load kept would depend on the order of the shards
                    raise CheckpointError(f"tensor {name!r} is stored in both {self._where[name].name} and "
                                          f"{file.name}; remove the stale shard or re-save the checkpoint")
                self._where[name] = file
            self._close_all()

    def _close_all(self) -> None:
        self._stack.close()
        self._stack = ExitStack()
        self._open.clear()

    def __len__(self) -> int:
        """How many tensors the checkpoint holds."""
        if not self._where:
            self._index_all()
        return len(self._where)

    def __iter__(self) -> Iterator[tuple[Path, str]]:
        if not self._where:
            self._index_all()
        try:
            for file in self.files:
                for name in list(self._handle(file).keys()):
                    yield file, name
                self._close_all()  # unmap the shard before the next one
        finally:
            self._close_all()

    def read(self, name: str) -> torch.Tensor:
        """One tensor as the model sees it: block-scaled FP8 weights (DeepSeek-V3 / MiMo-V2-Flash checkpoints,
        `weight` in float8_e4m3fn + `weight_scale_inv` per 128x128 block) come back dequantized to fp32."""
        tensor = self._raw(name)
        if tensor.dtype == torch.float8_e4m3fn and name + "_scale_inv" in self._where:
            return dequantize_fp8_blocks(tensor, self._raw(name + "_scale_inv"), dtype=torch.float32)
        return tensor

    def _raw(self, name: str) -> torch.Tensor:
        file = self._where.get(name)
        if file is None:
            raise CheckpointError(f"checkpoint has no tensor {name!r}; it is incomplete: re-download or re-save it")
        try:
            return self._handle(file).get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"{file}: tensor {name!r} cannot be read ({reason(e)}); the file is truncated or "
                                  "corrupt: re-download or re-save it") from None
