"""Bad input fails fast with one clear, one-line error naming the file/field and the fix, and leaves nothing behind.

Every load failure is checked for: the exact exception type (ModelFormatError / CheckpointError / ValueError),
the key parts of the message, a single-line message, an unchanged model directory, and no file descriptor or
memory map left open on the checkpoint's files. Runtime failures (forward / generate) leave the model usable.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from hf_tiny import save_tiny
from safetensors.torch import load_file, save_file
from one_line import raises_one_line

import offload
from offload import CheckpointError, ModelFormatError

INDEX = "model.safetensors.index.json"
Q1 = "model.layers.1.self_attn.q_proj.weight"  # a tensor every check below can damage


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    """A tiny 2-layer Mixtral checkpoint in one model.safetensors."""
    directory = tmp_path_factory.mktemp("single")
    save_tiny("mixtral", directory, num_hidden_layers=2)
    return directory


@pytest.fixture(scope="module")
def sharded(single, tmp_path_factory) -> Path:
    """The same weights as several shards plus model.safetensors.index.json."""
    directory = tmp_path_factory.mktemp("sharded")
    sd = load_file(single / "model.safetensors")
    names = sorted(sd)
    chunks = [names[i::3] for i in range(3)]
    files = [f"model-{i + 1:05d}-of-00003.safetensors" for i in range(3)]
    for file, chunk in zip(files, chunks):
        save_file({n: sd[n] for n in chunk}, directory / file, metadata={"format": "pt"})
    weight_map = {n: file for file, chunk in zip(files, chunks) for n in chunk}
    total = sum(t.numel() * t.element_size() for t in sd.values())
    (directory / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    for extra in ("config.json", "generation_config.json"):
        shutil.copy(single / extra, directory / extra)
    return directory


@pytest.fixture(scope="module")
def model(single):
    return offload.load(single)


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def _snapshot(directory: Path) -> dict:
    if not directory.exists():
        return {}
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob("*")}


def _handles_into(directory: Path) -> list[str]:
    """Open file descriptors and memory maps of this process that point into `directory`."""
    root = str(directory.resolve())
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(root):
            found.append(f"fd {fd} -> {target}")
    with open("/proc/self/maps") as maps:
        found += [line.strip() for line in maps if root in line]
    return found


def _fails_cleanly(source, directory: Path | None, exc_type: type, *parts: str, fix: tuple[str, ...]) -> str:
    """offload.load(source) raises exactly exc_type with a one-line message containing every part and one of
    the fix phrases, and neither changes `directory` nor keeps a handle on its files."""
    directory = Path(source) if directory is None else directory
    before = _snapshot(directory)
    message = raises_one_line(lambda: offload.load(source), exc_type, *parts)
    assert issubclass(exc_type, ValueError)  # both error types are ValueErrors too
    assert any(f in message for f in fix), f"no fix ({fix}) in {message!r}"
    assert _snapshot(directory) == before, "a failed load changed the model directory"
    if directory.exists():
        assert not _handles_into(directory), "a failed load left files open/mapped"
    return message


def _rewrite(file: Path, edit) -> None:
    sd = load_file(file)
    edit(sd)
    save_file(sd, file, metadata={"format": "pt"})


REDOWNLOAD = ("re-download", "re-save", "re-export")


# --- the model directory and config.json ------------------------------------------------------------------

def test_directory_without_config_json(single, tmp_path):
    path = _copy(single, tmp_path)
    (path / "config.json").unlink()
    _fails_cleanly(path, None, ModelFormatError, "config.json", str(path), fix=("point offload.load at",))


@pytest.mark.parametrize("relative", [None, "no_such_model", "no/such/model", "no_such_org/no_such_model"])
def test_path_that_does_not_exist(tmp_path, monkeypatch, relative):
    """Absolute, bare-name and nested paths; 'a/b' is also a hub id, which is offline here: still one clear error."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = str(tmp_path / "missing") if relative is None else relative
    message = _fails_cleanly(source, tmp_path, ModelFormatError, source, fix=("pass a directory", "check the path"))
    assert "no such" in message
    assert not (tmp_path / "missing").exists()


def test_config_json_invalid_json(single, tmp_path):
    path = _copy(single, tmp_path)
    (path / "config.json").write_text('{"model_type": "mixtral", "hidden_size": 64,')
    _fails_cleanly(path, None, ModelFormatError, "config.json", "not valid JSON", fix=("re-export",))


@pytest.mark.parametrize("model_type", ["llama", None])
def test_unknown_model_type_lists_supported(single, tmp_path, model_type):
    path = _copy(single, tmp_path)
    config = json.loads((path / "config.json").read_text())
    if model_type is None:
        del config["model_type"]
    else:
        config["model_type"] = model_type
    (path / "config.json").write_text(json.dumps(config))
    message = _fails_cleanly(path, None, ModelFormatError, "config.json", "model_type", repr(model_type),
                             fix=("supported:",))
    supported = message.split("supported:")[1]
    for arch in ("mixtral", "qwen3_moe", "olmoe", "gpt_oss", "mimo_v2_flash", "deepseek_v2", "deepseek_v3",
                 "glm4_moe", "qwen3_5_moe"):
        assert arch in supported


def test_config_missing_required_field(single, tmp_path):
    path = _copy(single, tmp_path)
    config = json.loads((path / "config.json").read_text())
    del config["num_local_experts"]
    (path / "config.json").write_text(json.dumps(config))
    _fails_cleanly(path, None, ModelFormatError, "config.json", "'num_local_experts'", fix=REDOWNLOAD)


# --- shards and the index -------------------------------------------------------------------------------

def test_missing_shard(sharded, tmp_path):
    """A shard the index names was deleted (an interrupted download)."""
    path = _copy(sharded, tmp_path)
    (path / "model-00002-of-00003.safetensors").unlink()
    _fails_cleanly(path, None, CheckpointError, INDEX, "model-00002-of-00003.safetensors", fix=("download",))


def test_index_names_a_shard_that_never_existed(sharded, tmp_path):
    path = _copy(sharded, tmp_path)
    index = json.loads((path / INDEX).read_text())
    index["weight_map"][Q1] = "model-00004-of-00004.safetensors"
    (path / INDEX).write_text(json.dumps(index))
    _fails_cleanly(path, None, CheckpointError, INDEX, "model-00004-of-00004.safetensors", fix=("download",))


def test_malformed_index(sharded, tmp_path):
    path = _copy(sharded, tmp_path)
    (path / INDEX).write_text('{"metadata": {}}')
    _fails_cleanly(path, None, CheckpointError, INDEX, "weight_map", fix=REDOWNLOAD)


def test_no_safetensors_at_all(single, tmp_path):
    path = _copy(single, tmp_path)
    (path / "model.safetensors").unlink()
    _fails_cleanly(path, None, CheckpointError, "*.safetensors", str(path), fix=("convert",))


@pytest.mark.parametrize("cut", ["half", "last_bytes", "header"])
@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_truncated_shard(single, sharded, tmp_path, layout, cut):
    path = _copy(single if layout == "single" else sharded, tmp_path)
    file = path / ("model.safetensors" if layout == "single" else "model-00003-of-00003.safetensors")
    size = file.stat().st_size
    os.truncate(file, {"half": size // 2, "last_bytes": size - 3, "header": 5}[cut])
    _fails_cleanly(path, None, CheckpointError, file.name, "truncated", fix=REDOWNLOAD)


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_tensor_with_wrong_shape(single, sharded, tmp_path, layout):
    path = _copy(single if layout == "single" else sharded, tmp_path)
    file = path / ("model.safetensors" if layout == "single"
                   else json.loads((path / INDEX).read_text())["weight_map"][Q1])
    _rewrite(file, lambda sd: sd.__setitem__(Q1, torch.zeros(64, 63)))
    _fails_cleanly(path, None, CheckpointError, file.name, Q1, "(64, 63)", "(64, 64)", "config.json",
                   fix=("re-export",))


def test_expert_with_wrong_shape(single, tmp_path):
    path = _copy(single, tmp_path)
    name = "model.layers.0.block_sparse_moe.experts.3.w2.weight"
    _rewrite(path / "model.safetensors", lambda sd: sd.__setitem__(name, torch.zeros(64, 95)))
    _fails_cleanly(path, None, CheckpointError, "model.safetensors", name, fix=("re-export",))


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_missing_tensor(single, sharded, tmp_path, layout):
    """The tensor is gone from its shard (the index, when present, still names it)."""
    path = _copy(single if layout == "single" else sharded, tmp_path)
    file = path / ("model.safetensors" if layout == "single"
                   else json.loads((path / INDEX).read_text())["weight_map"][Q1])
    _rewrite(file, lambda sd: sd.pop(Q1))
    _fails_cleanly(path, None, CheckpointError, str(path), "layers.1.attn.q", fix=("re-download",))


def test_failed_load_then_fixed_checkpoint_loads(single, tmp_path):
    """Nothing cached from a failed attempt: restoring the file makes the same path load and run."""
    path = _copy(single, tmp_path)
    good = (path / "model.safetensors").read_bytes()
    os.truncate(path / "model.safetensors", len(good) // 2)
    _fails_cleanly(path, None, CheckpointError, "model.safetensors", fix=REDOWNLOAD)
    (path / "model.safetensors").write_bytes(good)
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    assert torch.equal(offload.load(path).forward(ids), offload.load(single).forward(ids))


# --- runtime inputs ---------------------------------------------------------------------------------------

def _fails_at_runtime(model, call, *parts: str) -> None:
    ids = torch.tensor([[5, 7, 11, 13]])
    before, stats = model.forward(ids), model.stats()
    raises_one_line(call, ValueError, *parts)
    assert model.stats() == stats
    assert torch.equal(model.forward(ids), before), "a rejected call changed the model"


@pytest.mark.parametrize("bad", [256, -1])
@pytest.mark.parametrize("entry", ["forward", "generate", "generate_1d"])
def test_input_ids_out_of_vocab(model, entry, bad):
    ids = torch.tensor([[1, 2, bad, 3]])
    call = {"forward": lambda: model.forward(ids),
            "generate": lambda: model.generate(ids, max_new_tokens=2),
            "generate_1d": lambda: model.generate(ids[0], max_new_tokens=2)}[entry]
    _fails_at_runtime(model, call, "input_ids", "vocabulary", "256", str(bad), "tokenize")


@pytest.mark.parametrize("value", [-1])
def test_max_new_tokens_negative(model, value):
    _fails_at_runtime(model, lambda: model.generate(torch.tensor([[1, 2]]), max_new_tokens=value),
                      "max_new_tokens", ">= 0", str(value))


def test_max_new_tokens_zero_is_fine(model):
    ids = torch.tensor([[1, 2, 3]])
    assert model.generate(ids, max_new_tokens=0).tolist() == ids.tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
@pytest.mark.parametrize("entry", ["forward", "generate"])
def test_non_integer_input_tensor(model, entry, dtype):
    ids = torch.tensor([[1, 2, 3]]).to(dtype)
    call = (lambda: model.forward(ids)) if entry == "forward" else (lambda: model.generate(ids, max_new_tokens=2))
    _fails_at_runtime(model, call, "input_ids", "integer", str(dtype))
