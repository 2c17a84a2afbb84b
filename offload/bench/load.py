"""offload-bench load: time and memory of `offload.load`, each load in a fresh process (peak RSS is per process).

For each setup the child reports its RSS after `import offload` (base), its peak RSS (the high-water mark of its
address space, VmHWM: getrusage's would start from the parent's, kept across exec), its RSS once the load returned
(steady: what a user sees; a load that keeps freed memory from the OS counts it), and the load's wall time. The
target (issue 16): peak <= 1.15x steady, counted above the base: what a load holds at its worst against what the
model keeps.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

TARGET_RATIO = 1.15
_CHILD = """
import gc, json, resource, sys, time
import psutil, torch
import offload
torch.set_num_threads(int(sys.argv[3]))
process = psutil.Process()
base = process.memory_info().rss
start = time.perf_counter()
model = offload.load(sys.argv[1], device="cpu", **json.loads(sys.argv[2]))
seconds = time.perf_counter() - start
gc.collect()
steady = process.memory_info().rss
try:  # this address space's high-water mark: ru_maxrss would start from the parent's (kept across exec)
    peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
except OSError:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
print(json.dumps({"load_s": seconds, "base": base, "peak": peak, "steady": steady}))
"""


def measure(path: str | Path, options: dict, threads: int = 2) -> dict:
    """One load of `path` with `offload.load` options in a fresh process: load_s, base, peak, steady (bytes) and
    ratio ((peak - base) / (steady - base))."""
    done = subprocess.run([sys.executable, "-c", _CHILD, str(path), json.dumps(options), str(threads)],
                          capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"loading {path} with {options} failed: {done.stderr.strip()[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["ratio"] = (result["peak"] - result["base"]) / max(1, result["steady"] - result["base"])
    return result


def setups(source: Path, packed: Path | None, cached: int) -> dict[str, tuple[Path, dict]]:
    """The contenders of issue 16: resident bf16/a4e4/a4e2, offloaded bf16/a4e2 (`cached` experts per layer),
    and the packed a4e2 conversion resident and offloaded."""
    out = {"resident bf16": (source, {}), "resident a4e4 (quant at load)": (source, {"quant": "a4e4"}),
           "resident a4e2 (quant at load)": (source, {"quant": "a4e2"}),
           f"offloaded {cached}/layer bf16": (source, {"cache_experts": cached}),
           f"offloaded {cached}/layer a4e2 (quant at load)": (source, {"cache_experts": cached, "quant": "a4e2"})}
    if packed is not None:
        out |= {"packed a4e2, resident": (packed, {}),
                f"packed a4e2, offloaded {cached}/layer": (packed, {"cache_experts": cached})}
    return out


def run(source: Path, packed: Path | None = None, runs: int = 3, cached: int = 16, threads: int = 2,
        only: list[str] | None = None, json_out: Path | None = None) -> dict:
    """Every setup `runs` times, interleaved (one load of each, then again); medians."""
    chosen = {k: v for k, v in setups(source, packed, cached).items() if not only or any(o in k for o in only)}
    samples: dict[str, list[dict]] = {label: [] for label in chosen}
    for _ in range(runs):
        for label, (path, options) in chosen.items():
            samples[label].append(measure(path, options, threads))
    results = {label: {key: statistics.median(s[key] for s in runs_of) for key in runs_of[0]}
               | {"load_s_min": min(s["load_s"] for s in runs_of), "runs": len(runs_of)}
               for label, runs_of in samples.items()}
    _print(results, threads)
    if json_out:
        Path(json_out).write_text(json.dumps(results, indent=2))
    return results


def _print(results: dict, threads: int) -> None:
    from rich.table import Table

    from offload.bench.table import print_table

    gb = 1e9
    table = Table(title=f"offload.load, fresh process each, CPU, {threads} threads (medians)")
    for col in ("setup", "load s", "base GB", "peak GB", "steady GB", "peak/steady above base", "met"):
        table.add_column(col)
    for label, r in results.items():
        table.add_row(label, f"{r['load_s']:.2f}", f"{r['base'] / gb:.2f}", f"{r['peak'] / gb:.2f}",
                      f"{r['steady'] / gb:.2f}", f"{r['ratio']:.2f}", "yes" if r["ratio"] <= TARGET_RATIO else "NO")
    print_table(table)
