"""Files that lie (issue 15), the converter: it copies only the model's own files, writes files with normal
modes, cleans up after killed runs (only theirs) and reports a bad destination cleanly."""
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hf_tiny import save_tiny
from lying import DEMO, one_line

from offload.errors import CheckpointError, OffloadError
from offload.packed import convert


@pytest.fixture(scope="module")
def packed_demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("packed") / "demo"
    convert(DEMO, out)
    return out


def test_convert_copies_only_the_models_own_files(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0\n")
    src = tmp_path / "src"
    save_tiny("mixtral", src)
    (src / "tokenizer.model").symlink_to(secret)
    with pytest.raises(CheckpointError) as e:
        convert(src, tmp_path / "packed")
    assert "tokenizer.model" in one_line(e.value, "tokenizer.model")
    assert not (tmp_path / "packed").exists()
    # a Hugging Face cache snapshot: every file a symlink into the repo's blobs folder
    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (src / "tokenizer.model").unlink()
    for file in src.iterdir():
        shutil.copy(file, repo / "blobs" / file.name)
        (snapshot / file.name).symlink_to(Path("../../blobs") / file.name)
    convert(snapshot, tmp_path / "from-cache")
    assert (tmp_path / "from-cache" / "config.json").read_bytes() == (src / "config.json").read_bytes()
    assert not (tmp_path / "from-cache" / "config.json").is_symlink()


def test_convert_writes_files_with_the_modes_of_normal_files(packed_demo):
    umask = os.umask(0)
    os.umask(umask)
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in packed_demo.iterdir()}
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_convert_to_a_dangling_symlink_gives_a_clean_error(tmp_path):
    (tmp_path / "out").symlink_to(tmp_path / "nowhere")
    with pytest.raises(OffloadError) as e:
        convert(DEMO, tmp_path / "out")
    one_line(e.value, "out")
    assert not (tmp_path / "nowhere").exists()


HANG = textwrap.dedent("""
    import sys, time
    import offload.packed as packed
    write = packed._write
    def write_then_hang(*args):
        write(*args)
        print("written", flush=True)
        time.sleep(600)
    packed._write = write_then_hang
    packed.convert(sys.argv[1], sys.argv[2])
""")


def _hang_in_convert(dest: Path) -> subprocess.Popen:
    run = subprocess.Popen([sys.executable, "-c", HANG, str(DEMO), str(dest)], stdout=subprocess.PIPE, text=True)
    assert run.stdout.readline().strip() == "written"
    return run


def test_convert_removes_temp_dirs_of_killed_runs_only(tmp_path):
    def hidden() -> set[str]:
        return {p.name for p in tmp_path.iterdir() if p.name.startswith(".")}

    killed = _hang_in_convert(tmp_path / "a")
    killed.kill()
    killed.wait()
    assert len(hidden()) == 1  # what a killed run leaves behind
    running = _hang_in_convert(tmp_path / "b")  # the next convert removes it
    try:
        assert len(hidden()) == 1 and next(iter(hidden())).startswith(".b."), hidden()
        (tmp_path / ".mine.0123abcd.tmp").mkdir()  # a user's folder that merely looks like ours
        convert(DEMO, tmp_path / "a")
        left = hidden()
        assert len(left) == 2 and ".mine.0123abcd.tmp" in left, left  # and the running convert's folder
    finally:
        running.kill()
        running.wait()
