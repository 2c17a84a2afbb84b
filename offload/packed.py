"""The packed checkpoint `offload-convert` writes (FORMAT.md, "Packed checkpoint"): the model's own config and
tokenizer files, the non-expert weights and MTP layers under canonical names in dense.safetensors, and every
routed expert as one aligned blob in experts.bin, indexed with a checksum per blob by experts.json. The expert
file is memory-mapped at load, so a model larger than RAM still runs: the OS pages experts in from disk as they
are used. Nothing read is trusted: the index is checked whole at open, each blob against its checksum before
its first use, and the expert file against the size and times it had when opened before every use."""
from __future__ import annotations

import json
import mmap
import os
import re
import shutil
import uuid
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from offload.quant import PRESETS, QuantizedTensor, get_preset
from offload.quant.pack import pack_expert, read_index, unpack_expert

from .checkpoint import open_shard, reason, regular_file
from .engine.store import HostStore
from .errors import CheckpointError, OffloadError
from .loader import EXPERT, FP32_ALWAYS, checkpoint_dtype, load_spec, place, streamed_weights
from .model.predictor import FILENAME as PREDICTOR
from .quantize import quantizer, role_spec
from .spec import ModelSpec

FORMAT = 2  # 1 had no checksums: refused, re-convert
INDEX, BLOBS, DENSE = "experts.json", "experts.bin", "dense.safetensors"
PAGE = 4096  # blobs start on page boundaries: a blob maps to whole pages
DTYPES = ("float32", "bfloat16", "float16")
SIDECAR_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "chat_template.jinja", "tokenizer.model", PREDICTOR)
STAGING = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")  # the hidden folder a convert writes in, beside its destination
LOCK = ".offload-convert.lock"  # in that folder, locked (flock) by the convert writing it for as long as it runs
RECONVERT = "re-convert the model with offload-convert"
QUANTIZED_KEY, QUANTIZED_ENTRY = "quantized", "weight"  # dense.safetensors metadata: names stored as blobs


def is_packed(path: Path) -> bool:
    return os.path.lexists(path / INDEX)


def blob_crc(key: str, blob) -> int:
    """CRC-32 of an expert's blob (bytes-like), started from that of its key "layer/expert", so that an index
    entry moved to another expert fails its check too."""
    return zlib.crc32(blob, zlib.crc32(key.encode()))


def file_crc(file: Path) -> int:
    crc = 0
    with open(file, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


# ---- writing ----

def convert(source: str | Path, dest: str | Path, dtype: torch.dtype | None = None, quant: str | None = None) -> Path:
    """Stream a checkpoint into the packed layout, written in a hidden folder beside `dest`, then renamed; quant: a
    preset of offload.quant.PRESETS applied as each tensor is read (a quantized model then loads without
    quantizing: the slow part of a `quant=` load is done once, here)."""
    if quant is not None:
        get_preset(quant)  # an unknown name fails before anything is read
    path, config, spec, adapter = load_spec(source)
    dtype = dtype or checkpoint_dtype(config)
    dest = Path(dest)
    if os.path.lexists(dest):
        raise OffloadError(f"{dest} already exists{' (a symbolic link)' if dest.is_symlink() else ''}; choose a "
                           "new output directory")
    sidecars = _sidecars(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(dest.parent)
    with _staging(dest) as tmp:
        for file in sidecars:
            shutil.copyfile(file, tmp / file.name)  # contents only: a new file's mode, as the others
        _write(path, spec, adapter, dtype, tmp, quant)
    return dest


def _sidecars(path: Path) -> list[Path]:
    """The side files to copy: regular files of the model. A symlink is one when it resolves inside the model
    folder or, in a Hugging Face cache snapshot (models--org--name/snapshots/REV, every file a link into the
    repo's blobs/), inside that repo's folder; any other (e.g. /etc/passwd as tokenizer.model) is refused."""
    in_cache = path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--")
    root = (path.parent.parent if in_cache else path).resolve()
    files = []
    for name in SIDECAR_FILES:
        file = path / name
        if not os.path.lexists(file):
            continue
        target = file.resolve()
        if not target.is_relative_to(root):
            raise CheckpointError(f"{file} links to {target}, outside the model ({root}); copy the file into the "
                                  "model directory, or remove the link")
        files.append(regular_file(file, "replace it with the model's file, or remove it"))
    return files


def _remove_stale(parent: Path) -> None:
    """Remove the hidden folders of converts that were killed (SIGKILL, power loss: no chance to clean up): ours
    by name and lock file, and unlocked; a folder whose lock is held is a convert still running."""
    import fcntl  # POSIX only, and only converting needs it

    for folder in parent.iterdir():
        if not STAGING.fullmatch(folder.name) or folder.is_symlink() or not (folder / LOCK).is_file():
            continue
        try:
            with open(folder / LOCK, "rb") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(folder)
        except OSError:  # locked by a running convert, or not ours to remove
            continue


@contextmanager
def _staging(dest: Path) -> Iterator[Path]:
    """A hidden folder beside `dest`, renamed to `dest` when the block completes and removed if it raises;
    locked while this process lives, so that only a killed run's folder is taken for stale (_remove_stale)."""
    import fcntl

    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()
    try:
        with open(tmp / LOCK, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield tmp
            (tmp / LOCK).unlink()  # still held through the open file until the rename
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write(path: Path, spec: ModelSpec, adapter, dtype: torch.dtype, out: Path, quant: str | None) -> None:
    """experts.bin (an expert packed and written as soon as all its tensors are read), dense.safetensors (the
    other tensors, MTP layers included; a quantized one as a one-entry blob, listed in its metadata), experts.json."""
    dense, index, offset = {}, {}, 0
    quantized = []  # dense weights stored as blobs
    with open(out / BLOBS, "wb") as blobs:
        for kind, key, value in streamed_weights(path, spec, adapter, dtype, torch.device("cpu"),
                                                 keep_quantized=quant is not None,
                                                 quantize=quantizer(quant) if quant else None):
            if kind == "expert":
                blob = pack_expert(value).numpy()
                name = f"{key[0]}/{key[1]}"
                index[name] = [offset, blob.size, blob_crc(name, blob)]
                blobs.write(blob)
                offset += blob.size
                pad = -offset % PAGE
                blobs.write(bytes(pad))
                offset += pad
                continue
            if kind == "mtp":
                key = "mtp." + key
                value = place(value, torch.float32 if key.endswith(FP32_ALWAYS) else dtype, value.device, False)
            if isinstance(value, QuantizedTensor):
                quantized.append(key)
                value = pack_expert({QUANTIZED_ENTRY: value})
            dense[key] = value.contiguous()
    save_file(dense, out / DENSE, metadata={"format": "pt", QUANTIZED_KEY: json.dumps(quantized)})
    shutil.copymode(out / BLOBS, out / DENSE)  # save_file creates its file 0600
    (out / INDEX).write_text(json.dumps({"format": FORMAT, "dtype": str(dtype).removeprefix("torch."),
                                         "quant": quant, "bytes": offset, "dense_crc32": file_crc(out / DENSE),
                                         "experts": index}))


# ---- reading ----

@dataclass
class Packed:
    """An opened packed checkpoint; `store` maps the experts (see ExpertFile)."""
    dtype: torch.dtype
    dense: dict[str, torch.Tensor]
    mtp: dict[str, torch.Tensor]
    store: HostStore


class ExpertFile:
    """experts.bin, memory-mapped read-only: the source of a HostStore's blobs. A blob is verified against its
    checksum before its first use; before every use the model calls `check`, which requires the file to keep
    the size and times it had when opened: a mapped file truncated under a running model kills it with SIGBUS
    at the next read of a lost page, and one rewritten in place changes its weights under it."""

    def __init__(self, file: Path, meta: dict) -> None:
        self.file, self.crcs = file, {key: crc for key, (_, _, crc) in meta["experts"].items()}
        self._handle = open(regular_file(file, RECONVERT), "rb")
        self.opened = os.fstat(self._handle.fileno())
        if self.opened.st_size != meta["bytes"]:
            raise CheckpointError(f"{file} is {self.opened.st_size} bytes, but {INDEX} says {meta['bytes']}: the "
                                  f"file was truncated or modified; {RECONVERT}")
        self._map = mmap.mmap(self._handle.fileno(), 0, access=mmap.ACCESS_READ)
        with warnings.catch_warnings():  # read-only mapping: we never write through these views
            warnings.simplefilter("ignore", UserWarning)
            self.mapped = torch.frombuffer(self._map, dtype=torch.uint8)

    def _identity(self, st: os.stat_result) -> tuple[int, int, int]:
        return st.st_size, st.st_mtime_ns, st.st_ctime_ns

    def check(self) -> None:
        now = os.fstat(self._handle.fileno())
        if self._identity(now) != self._identity(self.opened):
            raise CheckpointError(
                f"{self.file} changed on disk while the model was using it ({self.opened.st_size} -> {now.st_size} "
                "bytes); load the model again. To update a packed model in use, convert to a new directory and "
                "rename it into place")

    def release(self, blob: torch.Tensor) -> None:
        """Drop the pages of `blob` (a view of the mapping) from this process once it was copied: the page cache
        keeps them, but they no longer count against the process as a second copy of the expert."""
        if not hasattr(mmap, "MADV_DONTNEED"):  # Windows: no madvise
            return
        start = blob.data_ptr() - self.mapped.data_ptr()
        self._map.madvise(mmap.MADV_DONTNEED, start - start % PAGE, start % PAGE + blob.numel())

    def verify(self, key: tuple[int, int], blob: torch.Tensor) -> None:
        name = f"{key[0]}/{key[1]}"
        if blob_crc(name, blob.numpy()) != self.crcs[name]:
            raise CheckpointError(f"{self.file}: the blob of expert {name} (layer/expert) does not match its "
                                  f"checksum in {INDEX}: the file is damaged or was modified; {RECONVERT}")


def open_packed(path: Path, spec: ModelSpec) -> Packed:
    """Open a packed checkpoint of the model `spec` describes, checking all that can be checked at once: the
    index whole, the first blob's layout against the model, every blob's header (HostStore), the dense weights
    against their checksum, names, shapes and dtype. Blobs are checked against theirs before their first use."""
    meta = _read_meta(path / INDEX)
    dtype = getattr(torch, meta["dtype"])
    experts = ExpertFile(path / BLOBS, meta)
    blobs = _blob_views(experts, meta, spec)
    try:
        store = HostStore(blobs, source=experts)
    except CheckpointError as e:  # a blob laid out unlike the first
        raise CheckpointError(f"{experts.file}: {e}") from None
    dense, mtp = _read_dense(path / DENSE, meta, spec, dtype)
    return Packed(dtype, dense, mtp, store)


def _uint(value) -> bool:
    return type(value) is int and value >= 0


def _read_meta(file: Path) -> dict:
    """experts.json, every field typed (its experts are checked against the model by _blob_views)."""
    try:
        meta = json.loads(regular_file(file, RECONVERT).read_bytes())
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, nested too deep
        raise CheckpointError(f"{file} is not valid JSON ({type(e).__name__}); {RECONVERT}") from None
    version = meta.get("format") if isinstance(meta, dict) else None
    if version == 1:
        raise CheckpointError(f"{file}: packed by an older offload-convert, without checksums (format 1; this "
                              f"version reads format {FORMAT}); {RECONVERT}")
    if version != FORMAT:
        raise CheckpointError(f"{file}: packed format {version!r} is not one this version reads ({FORMAT}); "
                              f"{RECONVERT} of this version, or update moe-offload")
    experts = meta.get("experts")
    if not (meta.get("dtype") in DTYPES and meta.get("quant") in (None, *PRESETS) and _uint(meta.get("bytes"))
            and _uint(meta.get("dense_crc32"))
            and isinstance(experts, dict) and all(isinstance(v, list) and len(v) == 3 and all(map(_uint, v))
                                                  for v in experts.values())):
        raise CheckpointError(f"{file} is malformed (it needs dtype, quant (null or a preset), bytes, dense_crc32 and "
                              f"experts: \"layer/expert\" -> [offset, size, crc32]); {RECONVERT}")
    return meta


def _blob_views(experts: ExpertFile, meta: dict, spec: ModelSpec) -> dict[tuple[int, int], torch.Tensor]:
    """Views of every expert's blob, by (layer, expert). The index must list exactly the model's experts, each a
    page-aligned span inside the file, apart from the others, of the size the first blob's layout implies; that
    layout must hold the tensors config.json implies, in the index's dtype."""
    index, file = meta["experts"], experts.file
    want = {f"{layer}/{e}": (layer, e) for layer in spec.moe_layers for e in range(spec.router.num_experts)}
    if set(index) != set(want):
        odd = sorted(set(index) ^ set(want))
        raise CheckpointError(f"{file.with_name(INDEX)} lists other experts than config.json describes, e.g. "
                              f"{odd[:3]} (layer/expert); {RECONVERT}")
    end = 0
    for offset, nbytes, name in sorted((offset, nbytes, name) for name, (offset, nbytes, _) in index.items()):
        if offset < end or offset % PAGE or not nbytes or offset + nbytes > meta["bytes"]:
            raise CheckpointError(f"{file.with_name(INDEX)}: expert {name} is at bytes {offset}..{offset + nbytes}, "
                                  f"not a page-aligned span of {BLOBS} ({meta['bytes']} bytes) apart from the other "
                                  f"experts; {RECONVERT}")
        end = offset + nbytes
    views = {want[name]: experts.mapped[index[name][0]: index[name][0] + index[name][1]]
             for name in sorted(index, key=want.__getitem__)}
    (layer, expert), first = next(iter(views.items()))
    try:
        layout = read_index(first)
    except ValueError as e:
        raise CheckpointError(f"{file}: the blob of expert {layer}/{expert} is not an expert blob: {e}; "
                              f"{RECONVERT}") from None
    if (size := {blob.numel() for blob in views.values()}) != {layout["size"]}:
        raise CheckpointError(f"{file.with_name(INDEX)}: blob sizes {sorted(size)[:3]} differ from the "
                              f"{layout['size']} bytes of the experts' layout; {RECONVERT}")
    prefix = f"layers.{layer}.experts.{expert}."
    implied = {k[len(prefix):]: _implied(k, s, meta) for k, s in spec.expected_shapes().items()
               if k.startswith(prefix)}
    stored = {name: (e["fmt"], e["tensors"].get("data", [None])[0], e["shape"], e["params"].get("bits"),
                     e["params"].get("group_size")) for name, e in layout["entries"].items()}
    if not all(_matches(stored.get(name), want) for name, want in implied.items()) or set(stored) != set(implied):
        raise CheckpointError(f"{file}: the experts hold {stored}, but config.json and {INDEX} imply {implied}; "
                              f"{RECONVERT}")
    return views


def _implied(name: str, shape: tuple[int, ...], meta: dict) -> tuple:
    """(format, dtype of dense data, shape, bits, group size) a weight of the model is stored as."""
    how = role_spec(get_preset(meta["quant"]), name) if meta.get("quant") else None
    if how is None or how.fmt == "none":
        return "dense", "float32" if name.endswith(FP32_ALWAYS) else meta["dtype"], list(shape), None, None
    return how.fmt, None, list(shape), how.bits, how.group_size


def _matches(stored: tuple | None, implied: tuple) -> bool:
    """Stored as implied; a weight that arrived quantized (gpt-oss MXFP4) is kept as it came by a preset."""
    return stored == implied or (stored is not None and stored[0] == "mxfp4" and implied[0] != "dense"
                                 and stored[2] == implied[2])


def _quantized(name: str, blob: torch.Tensor, file: Path, implied: tuple) -> QuantizedTensor:
    """A quantized dense weight from its one-entry blob, laid out as the preset implies."""
    try:
        entries = unpack_expert(blob)
    except ValueError as e:
        raise CheckpointError(f"{file}: tensor {name!r} is not a quantized weight: {e}; {RECONVERT}") from None
    weight = entries.get(QUANTIZED_ENTRY)
    stored = None if len(entries) != 1 or not isinstance(weight, QuantizedTensor) else (
        weight.fmt, None, list(weight.shape), weight.params.get("bits"), weight.params.get("group_size"))
    if not _matches(stored, implied):
        raise CheckpointError(f"{file}: tensor {name!r} holds {stored}, but config.json and {INDEX} imply {implied}; "
                              f"{RECONVERT}")
    return weight


def _read_dense(file: Path, meta: dict, spec: ModelSpec, dtype: torch.dtype
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(non-expert weights, MTP weights) in memory of their own, once the file matches its checksum."""
    if file_crc(regular_file(file, RECONVERT)) != meta["dense_crc32"]:
        raise CheckpointError(f"{file} does not match its checksum in {INDEX}: the file is damaged or was "
                              f"modified; {RECONVERT}")
    try:
        with open_shard(file) as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
            quantized = json.loads((f.metadata() or {}).get(QUANTIZED_KEY, "[]"))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file} cannot be read as safetensors ({reason(e)}); {RECONVERT}") from None
    if not isinstance(quantized, list) or not set(quantized) <= set(tensors):
        raise CheckpointError(f"{file}: its {QUANTIZED_KEY!r} metadata is not a list of its tensors; {RECONVERT}")
    expected = {k: s for k, s in spec.expected_shapes().items() if not EXPERT.fullmatch(k)}
    for name in quantized:
        tensors[name] = _quantized(name, tensors[name], file, _implied(name, expected.get(name, ()), meta))
    dense = {k: v for k, v in tensors.items() if not k.startswith("mtp.")}
    if set(dense) != set(expected):
        raise CheckpointError(f"{file} holds other tensors than config.json describes, e.g. "
                              f"{sorted(set(dense) ^ set(expected))[:3]}; {RECONVERT}")
    for name, t in tensors.items():
        if name in quantized:
            continue
        want = torch.float32 if name.endswith(FP32_ALWAYS) else dtype
        if t.dtype != want or tuple(t.shape) != expected.get(name, tuple(t.shape)):
            raise CheckpointError(f"{file}: tensor {name!r} is {t.dtype} {tuple(t.shape)}, but config.json and "
                                  f"{INDEX} imply {want} {expected.get(name, '')}; {RECONVERT}")
    return dense, {k[len("mtp."):]: v for k, v in tensors.items() if k.startswith("mtp.")}
