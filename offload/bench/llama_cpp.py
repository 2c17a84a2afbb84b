"""llama.cpp as a contender of `offload-bench e2e`, never a dependency of moe-offload.

llama-cpp-python is built once from its PyPI sdist (CMAKE_ARGS="-DGGML_NATIVE=ON", several minutes) into a cache
folder that only the bench's subprocesses put on sys.path; the checkpoint is converted to GGUF BF16 with the
`convert_hf_to_gguf.py` the sdist vendors and quantized to Q4_0 with `llama_cpp.llama_model_quantize`.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

CACHE = Path.home() / ".cache" / "moe-offload" / "llama-cpp"
PACKAGE = "llama-cpp-python"
CMAKE_ARGS = "-DGGML_NATIVE=ON"
QUANTS = {"bf16": None, "q4_0": 2}  # LLAMA_FTYPE_MOSTLY_Q4_0 = 2 (llama.h)


class Unavailable(RuntimeError):
    """llama.cpp cannot be built or run here; the message is the reason the contender is skipped."""


def site_dir(cache: Path = CACHE) -> Path:
    return cache / "site"


def _run(cmd: list[str], log: Path, env: dict | None = None, timeout: float = 3600) -> None:
    with log.open("w") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, timeout=timeout)
    if done.returncode:
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        raise Unavailable(f"{' '.join(cmd[:4])} ... failed (exit {done.returncode}; log {log}): " + " | ".join(tail))


def _sdist(cache: Path) -> Path:
    found = sorted((cache / "sdist").glob("llama_cpp_python-*.tar.gz"))
    if found:
        return found[-1]
    (cache / "sdist").mkdir(parents=True, exist_ok=True)
    print(f"llama.cpp: downloading the {PACKAGE} sdist from PyPI into {cache / 'sdist'}", file=sys.stderr)
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(cache / "sdist"),
          PACKAGE], cache / "download.log")
    found = sorted((cache / "sdist").glob("llama_cpp_python-*.tar.gz"))
    if not found:
        raise Unavailable(f"pip download {PACKAGE} left no sdist in {cache / 'sdist'}")
    return found[-1]


def ensure_built(cache: Path = CACHE) -> Path:
    """The folder holding the built `llama_cpp` package (and the vendored converter), building it if absent."""
    site = site_dir(cache)
    src = cache / "src"
    if (site / "llama_cpp").is_dir() and (src / "convert_hf_to_gguf.py").is_file():
        return site
    if shutil.which("cmake") is None and not any(Path(p).joinpath("cmake").exists() for p in sys.path):
        raise Unavailable("building llama-cpp-python needs cmake and a C++ compiler")
    sdist = _sdist(cache)
    if not (src / "convert_hf_to_gguf.py").is_file():
        _extract_converter(sdist, src)
    if not (site / "llama_cpp").is_dir():
        print(f"llama.cpp: building {sdist.name} with CMAKE_ARGS={CMAKE_ARGS} into {site} "
              "(once; several minutes on 2 cores)", file=sys.stderr)
        tmp = site.with_name("site.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        env = os.environ | {"CMAKE_ARGS": CMAKE_ARGS, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}
        _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-cache-dir", "--target", str(tmp), str(sdist),
              "diskcache"], cache / "build.log", env)
        tmp.rename(site)
    return site


def _extract_converter(sdist: Path, src: Path) -> None:
    """convert_hf_to_gguf.py, its conversion/ package and gguf-py, from the sdist's vendor/llama.cpp."""
    tmp = src.with_name("src.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    keep = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            parts = member.name.split("/vendor/llama.cpp/", 1)
            if len(parts) == 2 and parts[1].startswith(keep) and (member.isfile() or member.isdir()):
                member.name = parts[1]
                tar.extract(member, tmp, filter="data")
    tmp.rename(src)


def python_env(site: Path) -> dict:
    """The environment a subprocess needs to import the built llama_cpp (and nothing else changes)."""
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    return os.environ | {"PYTHONPATH": path}


def ensure_gguf(checkpoint: Path, quant: str, cache: Path = CACHE) -> Path:
    """The checkpoint as GGUF (bf16, or quantized from the bf16 file), converted once into the cache."""
    site = ensure_built(cache)
    out = cache / "gguf" / f"{checkpoint.name}-{quant}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    if QUANTS[quant] is None:
        print(f"llama.cpp: converting {checkpoint} to {out.name} with the vendored convert_hf_to_gguf.py",
              file=sys.stderr)
        _run([sys.executable, "-m", "offload.bench.llama_cpp_convert", str(cache / "src"), str(checkpoint), str(tmp)],
             cache / f"convert-{quant}.log", python_env(site))
    else:
        source = ensure_gguf(checkpoint, "bf16", cache)
        print(f"llama.cpp: quantizing {source.name} to {out.name} (llama_model_quantize)", file=sys.stderr)
        _run([sys.executable, "-m", "offload.bench.llama_cpp_convert", "--quantize", str(QUANTS[quant]), str(source),
              str(tmp)], cache / f"quantize-{quant}.log", python_env(site))
    tmp.rename(out)
    return out


def gguf_active_bytes(path: Path, src: Path = CACHE / "src") -> tuple[int, int]:
    """(bytes read per decoded token, total bytes) of a GGUF: every tensor but the embedding table (one row is
    read), experts scaled by top-k / experts, from the file's own tensor sizes (whatever types quantize chose)."""
    sys.path.insert(0, str(src / "gguf-py"))
    try:
        from gguf import GGUFReader
    finally:
        sys.path.remove(str(src / "gguf-py"))
    reader = GGUFReader(path)
    fields = {f.name: f for f in reader.fields.values()}

    def scalar(suffix: str) -> int:
        field = next(f for name, f in fields.items() if name.endswith(suffix))
        return int(field.parts[field.data[0]][0])

    share = scalar(".expert_used_count") / scalar(".expert_count")
    active = total = 0
    for t in reader.tensors:
        total += int(t.n_bytes)
        if t.name == "token_embd.weight":
            active += int(t.n_bytes) // int(t.shape[-1])
        else:
            active += int(t.n_bytes * share) if "_exps" in t.name else int(t.n_bytes)
    return active, total
