"""Expert blobs have one layout whatever order a checkpoint stores its tensors in.

On checkpoints whose shards hand the loader one expert's tensors in another order than the next expert's
(transformers' save_pretrained with a small max_shard_size; shards holding the tensors in reverse order under
a shuffled index), offloaded experts (any cache size, placement and miss policy) and converted checkpoints give
the resident model's logits and tokens bit for bit; a blob in another layout is refused, never misread.
"""
from __future__ import annotations

import json
import random
import shutil
import struct
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_tiny import SHARD_SIZES, save_tiny
from safetensors.torch import load_file, save_file

import offload
from offload import CheckpointError
from offload.checkpoint import TensorStream
from offload.engine.store import HostStore
from offload.loader import EXPERT, load_spec
from offload.packed import convert
from offload.quant import QuantizedTensor, pack_expert, quantize, read_index, unpack_expert

INDEX = "model.safetensors.index.json"
IDS = torch.randint(1, 256, (2, 24), generator=torch.Generator().manual_seed(4))
PROMPT = IDS[:1, :8]


def _loader_view(path: Path) -> tuple[dict, dict]:
    """For every expert: its roles in the order the loader meets them, and the shards they come from."""
    path, _, _, adapter = load_spec(path)
    roles, shards = defaultdict(list), defaultdict(set)
    with TensorStream(path) as stream:
        for file, name in stream:
            for canonical, _ in adapter.convert(name, stream.read):
                if m := EXPERT.fullmatch(canonical):
                    roles[int(m[1]), int(m[2])].append(m[3])
                    shards[int(m[1]), int(m[2])].add(file.name)
    return {k: tuple(v) for k, v in roles.items()}, shards


def _save_reversed(tensors: dict[str, torch.Tensor], file: Path) -> None:
    """A float32 safetensors file listing and storing its tensors in reverse name order (save_file sorts them;
    safe_open's keys() sorts them back, so only the assignment to shards changes what the loader meets)."""
    names, header, offset = sorted(tensors, reverse=True), {}, 0
    for name in names:
        t = tensors[name]
        assert t.dtype == torch.float32
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name in names:
            f.write(tensors[name].reshape(-1).view(torch.uint8).numpy().tobytes())


def _reversed_shards(src: Path, dst: Path, per_shard: int = 5) -> Path:
    """`src`'s tensors in reverse name order, `per_shard` to a shard (so the first shard holds the last
    tensors, and an expert cut by a shard boundary arrives later roles first), indexed by a shuffled weight_map."""
    tensors = load_file(src / "model.safetensors")
    names, weight_map = sorted(tensors, reverse=True), {}
    for i in range(0, len(names), per_shard):
        file = f"model-{i // per_shard + 1:05d}.safetensors"
        _save_reversed({n: tensors[n] for n in names[i: i + per_shard]}, dst / file)
        weight_map |= dict.fromkeys(names[i: i + per_shard], file)
    items = list(weight_map.items())
    random.Random(0).shuffle(items)
    (dst / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": dict(items)}))
    for config in src.glob("*.json"):
        shutil.copy(config, dst)
    return dst


@dataclass
class Case:
    arch: str
    path: Path
    logits: torch.Tensor  # the resident model's forward(IDS)
    tokens: list  # the resident model's greedy generate(PROMPT, 16)


@pytest.fixture(scope="module", params=["save_pretrained", "reversed"])
def checkpoint(request, tiny, tiny_sharded, tmp_path_factory) -> Case:
    """An adversarially sharded checkpoint of the `tiny` model, checked to be adversarial, with its resident
    outputs (which equal the single-file checkpoint's)."""
    arch, single, _ = tiny
    if request.param == "save_pretrained":
        path = tiny_sharded[1]
    else:
        path = _reversed_shards(single, tmp_path_factory.mktemp(f"{arch}-reversed"))
    roles, shards = _loader_view(path)
    assert any(len(files) > 1 for files in shards.values()), f"{arch}: no expert spans shards"
    if request.param == "reversed" or arch in SHARD_SIZES:
        assert len(set(roles.values())) > 1, f"{arch}: every expert arrives in one order {set(roles.values())}"
    resident = offload.load(path)
    logits = resident.forward(IDS)
    assert torch.equal(logits, offload.load(single).forward(IDS)), "the resharded checkpoint is another model"
    return Case(arch, path, logits, resident.generate(PROMPT, max_new_tokens=16).tolist())


def _check(model, case: Case, what: str) -> None:
    logits = model.forward(IDS)
    assert torch.equal(logits, case.logits), f"{case.arch}, {what}: max |dlogits| {(logits - case.logits).abs().max()}"
    assert model.generate(PROMPT, max_new_tokens=16).tolist() == case.tokens, f"{case.arch}, {what}"


@pytest.mark.parametrize("placement", ["inclusive", "exclusive"])
@pytest.mark.parametrize("miss_policy", ["load", "cpu"])
def test_offloaded_equals_resident_bit_for_bit(checkpoint, placement, miss_policy):
    experts = load_spec(checkpoint.path)[2].router.num_experts
    for cache in (1, experts // 2, experts):
        model = offload.load(checkpoint.path, cache_experts=cache, placement=placement, miss_policy=miss_policy)
        _check(model, checkpoint, f"cache_experts={cache}")
        if cache == 1:  # misses really went through the host blobs: copied, or computed where they live
            stats = model.stats()
            assert stats["misses"] > 0 and (miss_policy == "load" or stats["cpu_computed"] > 0), stats


def test_converted_equals_resident_bit_for_bit(checkpoint, tmp_path):
    packed = convert(checkpoint.path, tmp_path / "packed")
    for cache in (None, 1):
        _check(offload.load(packed, cache_experts=cache), checkpoint, f"converted, cache_experts={cache}")


def test_pack_expert_layout_is_canonical():
    g = torch.Generator().manual_seed(0)
    dense = {role: torch.randn(8, 4, generator=g) for role in ("up", "gate", "down")}
    q = quantize(torch.randn(64, 64, generator=g), 3, 32)
    shuffled = QuantizedTensor(q.fmt, q.shape, dict(reversed(q.params.items())), dict(reversed(q.tensors.items())))
    blob = pack_expert(dense | {"q": q})
    assert torch.equal(pack_expert({"q": shuffled} | dict(reversed(dense.items()))), blob), "the order mattered"
    entries = read_index(blob)["entries"]
    assert list(entries) == ["down", "gate", "q", "up"]
    assert list(entries["q"]["tensors"]) == sorted(q.tensors)


def _hand_pack(entries: dict[str, torch.Tensor]) -> torch.Tensor:
    """A dense expert blob written per FORMAT.md (JSON keys in pack_expert's sorted order), with the entries
    in the given order."""
    align = lambda n: -(-n // 256) * 256  # noqa: E731
    index, offset = {}, 0
    for name, t in entries.items():
        dtype = str(t.dtype).removeprefix("torch.")
        index[name] = {"fmt": "dense", "params": {}, "shape": list(t.shape),
                       "tensors": {"data": [dtype, list(t.shape), offset]}}
        offset = align(offset + t.nbytes)
    header = json.dumps({"entries": index}, separators=(",", ":")).encode()
    base = align(12 + len(header))
    blob = torch.zeros(base + offset, dtype=torch.uint8)
    blob[: 12 + len(header)] = torch.frombuffer(bytearray(b"MOEXPB01" + struct.pack("<I", len(header)) + header),
                                                dtype=torch.uint8)
    for name, t in entries.items():
        start = base + index[name]["tensors"]["data"][2]
        blob[start: start + t.nbytes] = t.reshape(-1).view(torch.uint8)
    return blob


def test_packed_checkpoint_with_a_blob_in_another_layout_is_refused(tmp_path):
    save_tiny("mixtral", tmp_path / "src", num_hidden_layers=2)
    packed = convert(tmp_path / "src", tmp_path / "packed")
    offset, nbytes, _ = json.loads((packed / "experts.json").read_text())["experts"]["1/2"]
    file = packed / "experts.bin"
    weights = unpack_expert(torch.from_numpy(np.fromfile(file, dtype=np.uint8, count=nbytes, offset=offset)))

    def put(blob: torch.Tensor) -> None:
        assert blob.numel() == nbytes
        with open(file, "r+b") as f:
            f.seek(offset)
            f.write(blob.numpy().tobytes())

    put(_hand_pack(dict(sorted(weights.items()))))  # the canonical layout, written by hand: accepted
    offload.load(packed, cache_experts=2)
    put(_hand_pack(dict(sorted(weights.items(), reverse=True))))  # as a converter that did not sort wrote it
    for cache in (None, 2):
        with pytest.raises(CheckpointError) as info:
            offload.load(packed, cache_experts=cache)
        message = str(info.value)
        assert "\n" not in message and "(layer 1, expert 2)" in message, message
        assert "['up', 'gate', 'down']" in message and "offload-convert" in message, message


def test_store_refuses_experts_of_different_dtypes():
    g = torch.Generator().manual_seed(0)
    experts = {(0, e): {role: torch.randn(8, 4, generator=g) for role in ("gate", "up", "down")} for e in range(3)}
    experts[0, 1]["down"] = experts[0, 1]["down"].bfloat16()
    with pytest.raises(CheckpointError, match=r"\(layer 0, expert 1\).*'down'.*bfloat16"):
        HostStore.pack(experts)


def test_a_tensor_stored_in_two_shards_is_refused(tmp_path):
    """Which copy the loader kept used to depend on the shard order (the last one won, silently)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    save_tiny("mixtral", src, num_hidden_layers=2)
    dst.mkdir()
    tensors = load_file(src / "model.safetensors")
    stale, moved = "model.layers.1.block_sparse_moe.experts.0.w1.weight", "model.norm.weight"
    files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    save_file({n: t for n, t in tensors.items() if n != moved}, dst / files[0])
    save_file({moved: tensors[moved], stale: torch.zeros_like(tensors[stale])}, dst / files[1])
    weight_map = dict.fromkeys(tensors, files[0]) | {moved: files[1]}
    (dst / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copy(src / "config.json", dst)
    with pytest.raises(CheckpointError, match=f"{stale}.*{files[0]}.*{files[1]}"):
        offload.load(dst)
