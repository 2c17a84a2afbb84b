"""offload-bench soak in small: generating offloaded and loading/unloading repeatedly leaves no thread or file
descriptor behind (the full run's figures: RELIABILITY.md). It runs in a fresh process, the real console
script: in the test process, threads and files of earlier tests' models end at any moment and blur the count."""
import json
import os
import subprocess
import sys
from pathlib import Path

from offload.bench.soak import slope


def test_slope():
    assert slope([0, 1, 2, 3], [5, 7, 9, 11]) == 2.0
    assert slope([1, 1], [3, 4]) == 0.0


def test_soak_leaves_no_threads_or_files(tmp_path):
    out = tmp_path / "soak.json"
    bench = Path(sys.executable).with_name("offload-bench")
    args = ["soak", "--tokens", "200", "--step", "100", "--cycles", "5", "--cache-experts", "4", "--json", str(out)]
    done = subprocess.run([str(bench), *args], capture_output=True, text=True, timeout=600, env=os.environ)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    decode, cycles = result["decode"], result["load_cycles"]
    assert decode["tokens"] >= 200
    first, _, highest, last = decode["threads"]
    assert highest == first and last == first
    assert decode["fds"][2] == decode["fds"][0]
    assert cycles["threads"][1] == cycles["threads"][0] and cycles["fds"][1] == cycles["fds"][0]
