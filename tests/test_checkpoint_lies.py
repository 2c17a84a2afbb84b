"""Files that lie (issue 15), the checkpoint: a weight whose header says an integer dtype, an index naming files
outside the model directory or malformed, a shard that is a FIFO."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hf_tiny import make_hf_model, save_tiny
from lying import one_line

import offload
from offload.errors import CheckpointError
from offload.packed import convert

INDEX = "model.safetensors.index.json"


def set_dtype(file: Path, pick, dtype: str) -> str:
    """Rewrite the header of one tensor (the first `pick` accepts) to `dtype`; its name."""
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8: 8 + n])
    name = next(k for k in sorted(header) if k != "__metadata__" and pick(k))
    header[name]["dtype"] = dtype
    text = json.dumps(header, separators=(",", ":")).encode()
    file.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])
    return name


@pytest.mark.parametrize("which", ["experts", "q_proj"])
def test_an_integer_weight_is_refused(tmp_path, which):
    save_tiny("mixtral", tmp_path / "src")
    name = set_dtype(tmp_path / "src" / "model.safetensors", lambda k: which in k, "I32")
    with pytest.raises(CheckpointError) as e:
        offload.load(tmp_path / "src")
    assert name in one_line(e.value, "model.safetensors")
    with pytest.raises(CheckpointError):
        convert(tmp_path / "src", tmp_path / "packed")
    assert not (tmp_path / "packed").exists()


def test_a_header_the_library_cannot_parse_gives_a_one_line_error(tmp_path):
    """safetensors quotes what it cannot parse, newlines included: the error used to span lines (found by
    `offload-bench fuzz`)."""
    save_tiny("mixtral", tmp_path / "src")
    set_dtype(tmp_path / "src" / "model.safetensors", lambda k: True, "F3\n2")
    with pytest.raises(CheckpointError) as e:
        offload.load(tmp_path / "src")
    one_line(e.value, "model.safetensors")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """(a sharded tiny mixtral directory, its reference logits)."""
    path = tmp_path_factory.mktemp("sharded") / "model"
    model = make_hf_model("mixtral")
    model.save_pretrained(path, max_shard_size="300KB")
    ids = torch.arange(1, 9)[None]
    return path, offload.load(path).forward(ids)


def with_index(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    index = json.loads((dst / INDEX).read_text())
    (dst / INDEX).write_text(json.dumps(edit(index)))
    return dst


def test_index_entries_must_be_plain_names_inside_the_model(sharded, tmp_path):
    path, reference = sharded
    shard = sorted(path.glob("*.safetensors"))[0].name

    def point(target: str):
        return lambda index: index | {"weight_map": {k: target if v == shard else v
                                                     for k, v in index["weight_map"].items()}}

    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(path / shard, outside / shard)
    messages = {}
    for case, target in [("relative", f"../../outside/{shard}"), ("absolute", str(outside / shard)),
                         ("relative-missing", f"../../nowhere/{shard}"), ("absolute-missing", f"/nowhere/{shard}")]:
        model = with_index(path, tmp_path / case / "model", point(target))
        (model / shard).unlink()
        with pytest.raises(CheckpointError) as e:
            offload.load(model)
        messages[case] = one_line(e.value, INDEX).replace(target, "TARGET").replace(str(model), "MODEL")
    # what an error says must not depend on whether a file outside the model exists
    assert messages["relative"] == messages["relative-missing"]
    assert messages["absolute"] == messages["absolute-missing"]
    # symlinked shards, as in the Hugging Face cache, still load
    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in path.iterdir():
        shutil.copy(file, repo / "blobs" / file.name)
        (snapshot / file.name).symlink_to(Path("../../blobs") / file.name)
    assert torch.equal(offload.load(snapshot).forward(torch.arange(1, 9)[None]), reference)


@pytest.mark.parametrize("index", ["null", "[]", '{"weight_map": null}', '{"weight_map": ["a"]}',
                                   '{"weight_map": {"model.norm.weight": 3}}', '"text"',
                                   '{"weight_map": {"model.norm.weight": "a\\nb.safetensors"}}'])
def test_a_malformed_index_gives_a_clean_error(sharded, tmp_path, index):
    model = shutil.copytree(sharded[0], tmp_path / "model")
    (model / INDEX).write_text(index)
    with pytest.raises(CheckpointError) as e:
        offload.load(model)
    one_line(e.value, INDEX)


FIFO_LOAD = textwrap.dedent("""
    import sys, offload
    from offload.errors import CheckpointError
    for path in sys.argv[1:]:
        try:
            offload.load(path)
        except CheckpointError as e:
            print("refused:", e)
""")


def test_a_shard_that_is_not_a_regular_file_is_refused(sharded, tmp_path):
    """A FIFO used to hang the load (with an index naming it, and without an index)."""
    indexed = shutil.copytree(sharded[0], tmp_path / "indexed")
    shard = sorted(indexed.glob("*.safetensors"))[0]
    shard.unlink()
    os.mkfifo(shard)
    plain = tmp_path / "plain"
    save_tiny("mixtral", plain)
    os.mkfifo(plain / "extra.safetensors")
    try:
        run = subprocess.run([sys.executable, "-c", FIFO_LOAD, str(indexed), str(plain)], capture_output=True,
                             text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("loading a checkpoint with a FIFO shard hangs")
    lines = run.stdout.splitlines()
    assert run.returncode == 0 and len(lines) == 2, run
    assert shard.name in lines[0] and "extra.safetensors" in lines[1], lines
