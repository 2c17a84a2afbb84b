"""offload-bench startup: how long what a user starts most takes, in fresh processes (medians of several).

Each command runs once unmeasured (page cache, the compiled-kernel cache), then `runs` times. A command
also fails the "quiet" column when it printed anything on stderr: that is not our output.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Targets (issue 14): seconds on the development machines (2 cores).
TARGETS = {"import offload": 0.7, "offload-chat --help": 1.0, "offload-chat -p (demo)": 2.5}


def commands(venv: Path) -> dict[str, list[str]]:
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    return {
        "import offload": [str(python), "-c", "import offload"],
        "offload-chat --help": [str(bin_dir / "offload-chat"), "--help"],
        "offload-convert --help": [str(bin_dir / "offload-convert"), "--help"],
        "offload-bench --help": [str(bin_dir / "offload-bench"), "--help"],
        "offload-chat -p (demo)": [str(bin_dir / "offload-chat"), "-p", "What is 12+35?"],
    }


def _time(command: list[str], cwd: Path) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}: {done.stderr.strip()[-300:]}")
    return elapsed, done.stderr


def run(venv: Path | None = None, runs: int = 5, json_out: str | None = None) -> dict:
    """Time every command of `venv` (default: this interpreter's); print a table, optionally write JSON."""
    venv = venv or Path(sys.executable).parent.parent
    cwd = Path.home()  # not a checkout: nothing importable by accident
    results = {}
    for label, command in commands(venv).items():
        _, stderr = _time(command, cwd)
        times = [_time(command, cwd)[0] for _ in range(runs)]
        results[label] = {"median_s": statistics.median(times), "min_s": min(times), "runs": runs,
                          "quiet": stderr == "", "target_s": TARGETS.get(label)}
    _print(results, venv)
    if json_out:
        Path(json_out).write_text(json.dumps(results, indent=2))
    return results


def _print(results: dict, venv: Path) -> None:
    from rich.table import Table

    from offload.bench.table import print_table

    table = Table(title=f"startup, fresh processes ({venv})")
    for col in ("command", "median s", "min s", "target s", "met", "quiet (empty stderr)"):
        table.add_column(col)
    for label, r in results.items():
        target = r["target_s"]
        met = "" if target is None else ("yes" if r["median_s"] <= target else "NO")
        table.add_row(label, f"{r['median_s']:.2f}", f"{r['min_s']:.2f}", "" if target is None else f"{target}",
                      met, "yes" if r["quiet"] else "NO")
    print_table(table)
