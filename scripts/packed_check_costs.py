"""What checking a packed checkpoint costs (RELIABILITY.md, "Files that lie"): opening it, the CRC of every blob
(what checking all at load adds) against copying them, with a warm and a cold page cache (per blob: what the first
use of a blob adds to its copy), and the experts.bin check made before every MoE layer.

    python scripts/packed_check_costs.py            # the demo, converted
    python scripts/packed_check_costs.py --large    # a generated Mixtral-shaped bf16 checkpoint (768 MiB experts)
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from offload.loader import load_spec
from offload.packed import blob_crc, convert, open_packed

LARGE = dict(vocab_size=1000, hidden_size=1024, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512)


def median_seconds(fn, n: int = 5) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def open_and_read(path: Path, what: str) -> tuple[float, float]:
    """(seconds to open, seconds to CRC or copy every blob) in this process."""
    _, _, spec, _ = load_spec(path)
    start = time.perf_counter()
    blobs = open_packed(path, spec).store.blobs._blobs  # unverified views: time the work itself
    opened = time.perf_counter() - start
    start = time.perf_counter()
    for (layer, expert), blob in blobs.items():
        blob_crc(f"{layer}/{expert}", blob.numpy()) if what == "crc" else blob.clone()
    return opened, time.perf_counter() - start


def cold(path: Path, what: str) -> tuple[float, float]:
    """open_and_read in a fresh process after both files left the page cache (medians of 3)."""
    runs = []
    for _ in range(3):
        for name in ("experts.bin", "dense.safetensors"):
            fd = os.open(path / name, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        out = subprocess.run([sys.executable, __file__, "--child", what, str(path)], capture_output=True, text=True,
                             check=True).stdout.split()
        runs.append(tuple(map(float, out)))
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def report(path: Path) -> None:
    cold_open, cold_crc = cold(path, "crc")  # first: a file this process maps cannot leave the page cache
    _, cold_copy = cold(path, "copy")
    _, _, spec, _ = load_spec(path)
    store = open_packed(path, spec).store
    blobs = store.blobs._blobs
    keys = sorted(blobs)
    size = sum(b.numel() for b in blobs.values())
    print(f"{len(keys)} blobs x {blobs[keys[0]].numel() / 2**20:.2f} MiB = {size / 2**20:.0f} MiB of experts, "
          f"dense.safetensors {(path / 'dense.safetensors').stat().st_size / 2**20:.1f} MiB")
    opened = median_seconds(lambda: open_packed(path, spec))
    crc = median_seconds(lambda: [blob_crc(f"{k[0]}/{k[1]}", blobs[k].numpy()) for k in keys])
    copy = median_seconds(lambda: [blobs[k].clone() for k in keys])
    print(f"open: {opened * 1e3:.1f} ms warm, {cold_open * 1e3:.0f} ms cold")
    print(f"CRC of every blob: {crc * 1e3:.1f} ms warm ({size / crc / 1e9:.2f} GB/s), {cold_crc * 1e3:.0f} ms cold; "
          f"copying them: {copy * 1e3:.1f} ms warm, {cold_copy * 1e3:.0f} ms cold")
    check = median_seconds(lambda: [store.check() for _ in range(1000)]) / 1000
    print(f"first use of a blob (page cache warm, CPU caches not): CRC {crc / len(keys) * 1e3:.3f} ms, its copy "
          f"{copy / len(keys) * 1e3:.3f} ms; experts.bin check per MoE layer: {check * 1e6:.1f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", action="store_true")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(*open_and_read(Path(args.child[1]), args.child[0]))
        return
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/tmp")) as work:
        source = "demo"
        if args.large:
            from transformers import AutoConfig, AutoModelForCausalLM

            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model("mixtral", **LARGE), dtype=torch.bfloat16)
            model.save_pretrained(Path(work) / "source")
            source = Path(work) / "source"
        report(convert(source, Path(work) / "packed"))


if __name__ == "__main__":
    main()
