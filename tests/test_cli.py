"""The real console scripts in a subprocess: one-shot, interactive, benchmarks, exit codes, one-line errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hf_tiny import save_tiny
from tiny_tokenizer import VOCAB_SIZE, save_tokenizer

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat")
    save_tiny("mimo_v2_flash", path, vocab_size=VOCAB_SIZE)
    save_tokenizer(path)
    return path


def run(*args, stdin: str = "", columns: int | None = None) -> subprocess.CompletedProcess:
    """A console script; `columns`: the terminal width its tables get (rich reads COLUMNS)."""
    env = None if columns is None else dict(os.environ, COLUMNS=str(columns))
    return subprocess.run([str(BIN / args[0]), *args[1:]], input=stdin, capture_output=True, text=True, timeout=300,
                          env=env)


def assert_fits(text: str, columns: int) -> None:
    """Every line within the width, and no word cut short to fit it."""
    assert "…" not in text, text
    assert max(map(len, text.splitlines())) <= columns, text


def test_one_shot_prompt(chat_model):
    import offload

    expected = offload.load(chat_model).generate([{"role": "user", "content": "hello"}], max_new_tokens=6)
    result = run("offload-chat", "--model", str(chat_model), "-p", "hello", "-n", "6")
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip("\n") == expected


def test_interactive_session(chat_model):
    result = run("offload-chat", "--model", str(chat_model), "-n", "4", stdin="hello\n/reset\nhi there\n/exit\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("model>") == 2


def test_end_of_input_exits_cleanly(chat_model):
    assert run("offload-chat", "--model", str(chat_model), stdin="").returncode == 0


def test_runtime_error_is_one_line_without_traceback(tmp_path):
    result = run("offload-chat", "--model", str(tmp_path), "-p", "hi")
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "config.json" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    debug = run("offload-chat", "--model", str(tmp_path), "-p", "hi", "--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_usage_error_exits_2(chat_model):
    assert run("offload-chat", "--model", str(chat_model), "--max-new-tokens", "-3").returncode == 2
    assert run("offload-chat", "--no-such-flag").returncode == 2
    assert run("offload-bench", "no-such-bench").returncode == 2


def test_cache_sim_bench(tmp_path):
    trace = tmp_path / "t.jsonl"
    rows = [{"seq": 0, "token": t, "layer": 0, "experts": [t % 5, (t % 5 + 1 + t % 3) % 5], "probs": [0.6, 0.4]}
            for t in range(40)]
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run("offload-bench", "cache-sim", "--trace", str(trace), "--policy", "all", "--capacity", "3", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    text = json.dumps(report)
    assert "lru" in text and "belady" in text
    help_text = run("offload-bench", "cache-sim", "--help", columns=80).stdout
    assert "Usage: offload-bench cache-sim [OPTIONS]" in help_text and "COMMAND" not in help_text
    assert "<bool>" not in help_text  # --json is a flag, shown as one


def test_tables_fit_the_terminal(tmp_path):
    """A table of several traces: at 80 columns whole words only, within the width; at 200 the same table
    uses the width (one line per policy, the trace names as headers)."""
    traces = []
    for i in range(5):
        trace = tmp_path / f"trace-{i}.jsonl"
        trace.write_text("".join(json.dumps({"seq": 0, "token": t, "layer": 0, "experts": [t % 5, 5 + (t + i) % 3],
                                             "probs": [0.6, 0.4]}) + "\n" for t in range(30)))
        traces += ["--trace", str(trace)]
    narrow = run("offload-bench", "cache-sim", *traces, "--capacity", "3", columns=80)
    assert narrow.returncode == 0, narrow.stderr
    assert_fits(narrow.stdout, 80)
    assert "trace-4.jsonl" in narrow.stdout
    wide = run("offload-bench", "cache-sim", *traces, "--capacity", "3", columns=200)
    assert_fits(wide.stdout, 200)
    header = next(line for line in wide.stdout.splitlines() if "policy" in line)
    assert all(f"trace-{i}.jsonl" in header for i in range(5)), wide.stdout


def test_offloaded_chat_with_plan(chat_model):
    result = run("offload-chat", "--model", str(chat_model), "-p", "hello", "-n", "6", "--device", "cpu",
                 "--cache-experts", "auto", "--plan")
    assert result.returncode == 0, result.stderr
    assert "expert slots per MoE layer" in result.stdout
    plain = run("offload-chat", "--model", str(chat_model), "-p", "hello", "-n", "6")
    assert result.stdout.rstrip("\n").endswith(plain.stdout.rstrip("\n"))
    assert run("offload-chat", "--model", str(chat_model), "--cache-experts", "zero", "-p", "x").returncode == 2


def test_kernel_bench_quick_speed_only(tmp_path):
    """The GEMV half of `offload-bench kernels` runs end to end and reports every kernel, side by side."""
    out = tmp_path / "kernels.json"
    result = run("offload-bench", "kernels", "--quick", "--speed-only", "--threads", "1", "--rows", "3",
                 "--json", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["rows"] == 3
    assert {"dense-bf16", "ours-dense-bf16", "ours-dense-fp32", "bnb-nf4", "ours-hqq4-g64", "torch-int4pack-4bit", "ours-hqq2-g32"} <= set(report["gemv"])
    assert all(len(r["passes_ms"]) == 3 and r["ms"] > 0 for r in report["gemv"].values())
    assert "quality" not in report and 0 < report["ratios"]["ours4_roofline"]
    assert "ours4_vs_dense" in result.stdout


def test_speculative_bench_small(tmp_path):
    """Plain and MTP decoding of the demo model side by side, resident and offloaded: same tokens."""
    out = tmp_path / "spec.json"
    result = run("offload-bench", "speculative", "--prompts", "3", "--runs", "2", "--max-new-tokens", "12",
                 "--json", str(out), columns=80)
    assert result.returncode == 0, result.stderr
    assert_fits(result.stdout, 80)
    assert "1st-draft" in result.stdout and "resident" in result.stdout
    report = json.loads(out.read_text())
    assert len(report) == 2 and all(r["identical_output"] for r in report.values())
    for r in report.values():
        assert len(r["plain"]["tok_s_runs"]) == 2 and len(r["speedup_runs"]) == 2
        assert r["mtp"]["speculative"]["verify_steps"] > 0
    offloaded = next(r for name, r in report.items() if name.startswith("offloaded"))
    assert offloaded["plain"]["expert_loads_per_token"] > 0


def test_startup_bench(tmp_path):
    """`offload-bench startup` times every command in fresh processes; each must also be quiet on stderr."""
    out = tmp_path / "startup.json"
    result = run("offload-bench", "startup", "--runs", "1", "--json", str(out), columns=80)
    assert result.returncode == 0, result.stderr
    assert_fits(result.stdout, 80)
    report = json.loads(out.read_text())
    assert {"import offload", "offload-chat --help", "offload-chat -p (demo)"} <= set(report)
    assert all(r["median_s"] > 0 for r in report.values())
    assert [name for name, r in report.items() if not r["quiet"]] == []
