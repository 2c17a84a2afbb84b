"""The contenders of `offload-bench e2e`, each timed in its own process (so its peak RSS is its own).

    python -m offload.bench.contenders NAME CHECKPOINT SETTINGS_JSON   ->  one JSON line on stdout

Every contender exposes the same greedy `generate(prompt_ids, n) -> ids`; the timing protocol is shared: one
warm-up, then per repetition the time to first token (prefill + one token) and the time for n tokens, whose
difference gives the decode rate.
"""
from __future__ import annotations

import json
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

Generate = Callable[[list[int], int], list[int]]
Loaded = tuple[Generate, Callable[[], dict]]  # generate, and what the contender says about its run


@dataclass(frozen=True)
class Contender:
    name: str
    kind: str  # "ours" | "transformers" | "accelerate" | "llama.cpp"
    quant: str = "bf16"  # ours: a preset or bf16; llama.cpp: bf16 | q4_0
    offloaded: bool = False
    options: dict = field(default_factory=dict)

    @property
    def needs_build(self) -> bool:
        return self.kind == "llama.cpp"


CONTENDERS = {c.name: c for c in [
    Contender("ours-resident-bf16", "ours"),
    Contender("ours-resident-a4e4", "ours", "a4e4"),
    Contender("ours-resident-a4e2", "ours", "a4e2"),
    Contender("ours-offloaded-bf16", "ours", offloaded=True),
    Contender("ours-offloaded-a4e2", "ours", "a4e2", offloaded=True),
    Contender("transformers", "transformers"),
    Contender("transformers-accelerate", "accelerate", offloaded=True),
    Contender("llama.cpp-bf16", "llama.cpp"),
    Contender("llama.cpp-q4_0", "llama.cpp", "q4_0"),
]}


def _load_ours(c: Contender, path: Path, s: dict) -> Loaded:
    import offload
    import torch

    kw = {"cache_experts": s["cache_experts"], "prefetch": 1, "miss_policy": "auto"} if c.offloaded else {}
    model = offload.load(path, device="cpu", quant=None if c.quant == "bf16" else c.quant, **kw)

    def generate(ids: list[int], n: int) -> list[int]:
        return model.generate(torch.tensor([ids]), max_new_tokens=n)[0, len(ids):].tolist()

    def stats() -> dict:
        engine = model.stats() if c.offloaded else {}
        return {k: engine[k] for k in ("hit_rate", "prediction_recall") if k in engine}
    return generate, stats


def _hf_generate(model) -> Generate:
    import torch

    def generate(ids: list[int], n: int) -> list[int]:
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return out[0, len(ids):].tolist()
    return generate


def _load_transformers(c: Contender, path: Path, s: dict) -> Loaded:
    import torch
    from transformers import AutoModelForCausalLM

    return _hf_generate(AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()), dict


def accelerate_device_map(model, offloaded: set[str]) -> dict[str, str]:
    """The fewest modules covering `model`, the `offloaded` ones on "disk", the rest on "cpu" (accelerate puts a
    hook that loads every submodule on a module mapped to "cpu", so no mapped module may hold an offloaded one)."""
    device_map: dict[str, str] = {}

    def visit(prefix: str, module) -> None:
        if prefix in offloaded or not any(o.startswith(f"{prefix}.") or not prefix for o in offloaded):
            device_map[prefix] = "disk" if prefix in offloaded else "cpu"
            return
        for name, child in module.named_children():
            visit(f"{prefix}.{name}" if prefix else name, child)
    visit("", model)
    return device_map


def _load_accelerate(c: Contender, path: Path, s: dict) -> Loaded:
    """transformers + accelerate "naive offloading" on a CPU-only machine, at our offloaded contenders' budget:
    accelerate offloads whole modules and a layer's experts are one module (the fused `mlp.experts`), so the
    experts of the first cache_experts/num_experts of the layers stay in RAM and the others go to "disk" (its
    offload folder, page-cached), loaded back by accelerate's hooks at every forward; the rest stays in RAM."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    cached = round(s["cache_experts"] / config.num_experts * config.num_hidden_layers)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    offloaded = {f"model.layers.{i}.mlp.experts" for i in range(cached, config.num_hidden_layers)}
    folder = tempfile.mkdtemp(prefix="moe-bench-accelerate-")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, offload_folder=folder,
                                                 device_map=accelerate_device_map(skeleton, offloaded)).eval()
    return _hf_generate(model), dict


def _load_llama_cpp(c: Contender, path: Path, s: dict) -> Loaded:
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=s["gguf"], n_ctx=s["prompt_tokens"] + s["tokens"] + 8, n_batch=512,
                          n_threads=s["threads"], n_threads_batch=s["threads"], verbose=False)

    def generate(ids: list[int], n: int) -> list[int]:
        llm.reset()
        out: list[int] = []
        step = ids
        for _ in range(n):
            llm.eval(step)
            step = [int(np.argmax(llm.scores[llm.n_tokens - 1]))]
            out += step
        return out
    return generate, dict


LOADERS = {"ours": _load_ours, "transformers": _load_transformers, "accelerate": _load_accelerate,
           "llama.cpp": _load_llama_cpp}


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def measure(c: Contender, path: Path, s: dict) -> dict:
    """Load, warm up, then `reps` timed repetitions; times in seconds, memory in bytes."""
    import torch

    torch.set_num_threads(s["threads"])
    prompt = s["prompt"]
    t0 = time.perf_counter()
    generate, stats = LOADERS[c.kind](c, path, s)
    load_s = time.perf_counter() - t0
    rss_loaded = _rss()
    generate(prompt, 2)
    samples = []
    for _ in range(s["reps"]):
        t0 = time.perf_counter()
        first = generate(prompt, 1)
        t1 = time.perf_counter()
        tokens = generate(prompt, s["tokens"])
        t2 = time.perf_counter()
        ttft, total = t1 - t0, t2 - t1
        samples.append({"ttft_s": ttft, "prefill_tok_s": len(prompt) / ttft,
                        "decode_tok_s": (s["tokens"] - 1) / max(1e-9, total - ttft)})
    rss_end = _rss()  # the kernel updates ru_maxrss lazily: it can lag the current RSS by a few pages
    return {"load_s": load_s, "rss_loaded": rss_loaded, "rss_end": rss_end,
            "peak_rss": max(rss_end, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
            "samples": samples, "tokens": tokens[:8], "first_token_agrees": first == tokens[:1],
            "stats": stats()}


def main() -> None:
    name, path, settings = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    print(json.dumps(measure(CONTENDERS[name], path, settings)))


if __name__ == "__main__":
    main()
