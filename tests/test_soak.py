"""offload-bench soak in small: generating offloaded and loading/unloading repeatedly leaves no thread or file
descriptor behind (the full run's figures: RELIABILITY.md)."""
from offload.bench.soak import run, slope


def test_slope():
    assert slope([0, 1, 2, 3], [5, 7, 9, 11]) == 2.0
    assert slope([1, 1], [3, 4]) == 0.0


def test_soak_leaves_no_threads_or_files(tmp_path):
    result = run("demo", tokens=200, step=100, load_cycles=5, cache_experts=4, json_out=tmp_path / "soak.json")
    decode, cycles = result["decode"], result["load_cycles"]
    assert decode["tokens"] >= 200
    first, _, highest, last = decode["threads"]
    assert highest == first and last == first
    assert decode["fds"][2] == decode["fds"][0]
    assert cycles["threads"][1] == cycles["threads"][0] and cycles["fds"][1] == cycles["fds"][0]
    assert (tmp_path / "soak.json").is_file()
