"""Files that lie (issue 15), the packed format: a damaged experts.json, experts.bin or dense.safetensors is
refused at load or before a blob is first used, and a file changed under a running model stops it cleanly."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from lying import DEMO, ask, one_line

import offload
from offload.errors import CheckpointError
from offload.packed import convert


@pytest.fixture(scope="module")
def packed_demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("packed") / "demo"
    convert(DEMO, out)
    return out


@pytest.fixture
def pack(packed_demo, tmp_path) -> Path:
    """A copy of the packed demo to damage."""
    return Path(shutil.copytree(packed_demo, tmp_path / "pack"))


def meta(pack: Path) -> dict:
    return json.loads((pack / "experts.json").read_text())


def flip(file: Path, offset: int, mask: int = 0x40) -> None:
    with open(file, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ mask]))


def blob_data(pack: Path, key: str) -> int:
    """File offset of the first tensor's data in expert `key`'s blob."""
    from offload.quant.pack import read_index

    offset, nbytes = meta(pack)["experts"][key][:2]
    raw = (pack / "experts.bin").read_bytes()[offset: offset + nbytes]
    return offset + read_index(torch.frombuffer(bytearray(raw), dtype=torch.uint8))["base"]


def test_half_truncated_experts_bin_is_refused(pack):
    """It used to load and answer 23+58=63 with exit 0."""
    size = (pack / "experts.bin").stat().st_size
    os.truncate(pack / "experts.bin", size // 2)
    with pytest.raises(CheckpointError) as e:
        ask(offload.load(pack, cache_experts=4))
    one_line(e.value, "experts.bin")
    chat = subprocess.run([sys.executable, "-m", "offload.cli.chat", "--model", str(pack), "-p", "What is 23+58?"],
                          capture_output=True, text=True)
    assert chat.returncode == 1 and "experts.bin" in chat.stderr and "Traceback" not in chat.stderr, chat


def _swap(m: dict) -> None:
    a, b = m["experts"]["1/0"], m["experts"]["1/1"]
    a[0], b[0] = b[0], a[0]


def _shorten(m: dict) -> None:
    m["experts"]["2/3"][1] -= 256


def _overlap(m: dict) -> None:
    m["experts"]["2/4"][0] = m["experts"]["2/3"][0] + 4096


INDEX_LIES = {
    "offset past the end": lambda m: m["experts"]["3/5"].__setitem__(0, 1 << 40),
    "negative offset": lambda m: m["experts"]["3/5"].__setitem__(0, -4096),
    "swapped offsets": _swap,
    "shortened size": _shorten,
    "size shorter than a blob header": lambda m: m["experts"]["1/0"].__setitem__(1, 9),  # found by the fuzzer
    "overlapping blobs": _overlap,
    "unknown format": lambda m: m.__setitem__("format", 99),
    "missing expert": lambda m: m["experts"].pop("4/7"),
    "extra expert": lambda m: m["experts"].__setitem__("9/0", m["experts"]["1/0"]),
    "float offset": lambda m: m["experts"]["1/2"].__setitem__(0, 0.5),
    "dtype that is not the data's": lambda m: m.__setitem__("dtype", "bfloat16"),
    "experts not a mapping": lambda m: m.__setitem__("experts", [1, 2]),
}


@pytest.mark.parametrize("lie", sorted(INDEX_LIES))
def test_an_index_that_lies_is_refused_at_load(pack, lie):
    """A resident load reads every blob, so the checksums speak at load too (swapped offsets)."""
    m = meta(pack)
    INDEX_LIES[lie](m)
    (pack / "experts.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError) as e:
        offload.load(pack)
    one_line(e.value, "experts.json", "experts.bin")


def test_a_pack_without_checksums_must_be_reconverted(pack):
    m = meta(pack)
    m["format"] = 1
    m["experts"] = {k: v[:2] for k, v in m["experts"].items()}
    (pack / "experts.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError) as e:
        offload.load(pack)
    assert "offload-convert" in one_line(e.value, "experts.json")


@pytest.mark.parametrize("cache_experts", [None, 4])
def test_a_flipped_bit_in_an_expert_is_caught(pack, cache_experts):
    """Resident: when the experts are read at load; offloaded: before a blob is first used."""
    for key in meta(pack)["experts"]:
        flip(pack / "experts.bin", blob_data(pack, key) + 4 * 17 + 3)  # an exponent bit of one weight
    with pytest.raises(CheckpointError) as e:
        ask(offload.load(pack, cache_experts=cache_experts))
    one_line(e.value, "experts.bin")


@pytest.mark.parametrize("key", ["1/0", "1/1"])
def test_the_magic_of_every_blob_is_checked(pack, key):
    """The first blob's raised a raw ValueError, and so did another's (found by offload-bench fuzz)."""
    flip(pack / "experts.bin", meta(pack)["experts"][key][0], 0x01)
    with pytest.raises(CheckpointError) as e:
        offload.load(pack, cache_experts=4)
    one_line(e.value, "experts.bin")


@pytest.mark.parametrize("damage", ["flipped bit", "truncated", "garbage index"])
def test_damaged_dense_weights_or_index_give_a_clean_error(pack, damage):
    """Resident loads raised raw SafetensorError / UnicodeDecodeError, or ran with a wrong weight."""
    dense = pack / "dense.safetensors"
    if damage == "flipped bit":
        flip(dense, dense.stat().st_size - 4 * 1000 - 1)
    elif damage == "truncated":
        os.truncate(dense, dense.stat().st_size // 2)
    else:
        (pack / "experts.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CheckpointError) as e:
        offload.load(pack)
    one_line(e.value, "dense.safetensors", "experts.json")


RUNNING = textwrap.dedent("""
    import os, sys, offload
    from offload.errors import OffloadError
    path, change, cache = sys.argv[1], sys.argv[2], sys.argv[3]
    model = offload.load(path, cache_experts=None if cache == "none" else int(cache))
    question = [{"role": "user", "content": "What is 23+58?"}]
    before = model.generate(question, max_new_tokens=12)
    blobs = os.path.join(path, "experts.bin")
    if change == "truncate":
        os.truncate(blobs, os.path.getsize(blobs) // 2)
    elif change == "truncate-predictor":
        os.truncate(os.path.join(path, "predictor.safetensors"), 16)
    else:  # rewritten in place, same size: every layer's experts rotated by one
        import json
        index = json.load(open(os.path.join(path, "experts.json")))["experts"]
        data = bytearray(open(blobs, "rb").read())
        old = bytes(data)
        for key, (offset, nbytes, *_) in index.items():
            layer, expert = key.split("/")
            src = index[f"{layer}/{(int(expert) + 1) % 16}"][0]
            data[offset: offset + nbytes] = old[src: src + nbytes]
        with open(blobs, "r+b") as f:
            f.write(data)
    try:
        after = model.generate(question, max_new_tokens=12)
    except OffloadError as e:
        print("error:", e)
        sys.exit(3)
    print("answer:", "same" if after == before else "changed")
""")


@pytest.mark.parametrize("change,cache", [("truncate", "2"), ("rewrite", "2"), ("truncate", "none"),
                                          ("truncate-predictor", "2")])
def test_a_packed_file_changed_under_a_running_model(pack, change, cache):
    """Never SIGBUS, never a changed answer: a clean error (or the same answer from memory of our own)."""
    run = subprocess.run([sys.executable, "-c", RUNNING, str(pack), change, cache], capture_output=True, text=True)
    assert run.returncode in (0, 3), (run.returncode, run.stderr[-2000:])
    assert "answer: changed" not in run.stdout
    if run.returncode == 3:
        assert "experts.bin" in run.stdout and "Traceback" not in run.stderr, run


