"""The contenders of `offload-bench e2e`, each timed in its own process (so its peak RSS is its own).

    python -m offload.bench.contenders NAME CHECKPOINT SETTINGS_JSON   ->  one JSON line on stdout

Every contender exposes the same greedy `generate(prompt_ids, n) -> ids`; the timing protocol is shared: one
warm-up, then per repetition one generation of n tokens, each token stamped as it comes out: the time to the first
(prefill + one token) and the decode rate over the n - 1 after it.
"""
from __future__ import annotations

import atexit
import json
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

Timed = tuple[list[int], list[float]]  # the new tokens, and the perf_counter time each came out
Generate = Callable[[list[int], int], Timed]
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
    Contender("ours-resident-bf16-eager", "ours", options={"cuda_graphs": False}),  # a GPU's decode without graphs
    Contender("ours-offloaded-bf16", "ours", offloaded=True),
    Contender("ours-offloaded-bf16-eager", "ours", offloaded=True, options={"cuda_graphs": False}),
    Contender("ours-offloaded-a4e2", "ours", "a4e2", offloaded=True),
    Contender("transformers", "transformers"),
    Contender("transformers-accelerate", "accelerate", offloaded=True),
    Contender("llama.cpp-bf16", "llama.cpp"),
    Contender("llama.cpp-q4_0", "llama.cpp", "q4_0"),
]}


def _load_ours(c: Contender, path: Path, s: dict) -> Loaded:
    import offload
    import torch
    from offload.generate import Sampling

    greedy = Sampling(0.0, 1.0, 0, 1.0, None)

    kw = {"cache_experts": s["cache_experts"], "prefetch": 1, "miss_policy": "auto"} if c.offloaded else {}
    kw |= c.options
    if "packed" in s:  # converted once by offload-bench e2e: the preset is in the pack
        model = offload.load(s["packed"], device=s["device"], **kw)
    else:
        model = offload.load(path, device=s["device"], quant=None if c.quant == "bf16" else c.quant, **kw)

    def generate(ids: list[int], n: int) -> Timed:
        # generate() hands back only the finished tensor; _tokens is the iterator of new tokens it consumes
        stamped = [(int(t[0]), time.perf_counter())
                   for t in model._tokens(torch.tensor([ids]), None, n, greedy, [], 0)]
        return [t for t, _ in stamped], [when for _, when in stamped]

    def stats() -> dict:
        engine = model.stats() if c.offloaded else {}
        return {k: engine[k] for k in ("hit_rate", "prediction_recall") if k in engine}
    return generate, stats


def _hf_generate(model) -> Generate:
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        """The time each new token comes out (the first put is the prompt)."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.prompt_seen = False

        def put(self, value) -> None:
            if self.prompt_seen:
                self.times.append(time.perf_counter())
            self.prompt_seen = True

        def end(self) -> None:
            pass

    def generate(ids: list[int], n: int) -> Timed:
        stamps = Stamps()
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids], device=model.device), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 streamer=stamps)
        return out[0, len(ids):].tolist(), stamps.times
    return generate


def _load_transformers(c: Contender, path: Path, s: dict) -> Loaded:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map=s["device"])
    return _hf_generate(model.eval()), dict


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
    experts = getattr(config, "num_experts", None) or config.n_routed_experts  # GLM-4.5 names them so only
    cached = round(s["cache_experts"] / experts * config.num_hidden_layers)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    offloaded = {f"model.layers.{i}.mlp.experts" for i in range(cached, config.num_hidden_layers)}
    folder = tempfile.mkdtemp(prefix="moe-bench-accelerate-")
    atexit.register(shutil.rmtree, folder, True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, offload_folder=folder,
                                                 device_map=accelerate_device_map(skeleton, offloaded)).eval()
    return _hf_generate(model), dict


def _load_llama_cpp(c: Contender, path: Path, s: dict) -> Loaded:
    """llama.cpp through llama-cpp-python's Llama (mmap, as llama.cpp loads by default); greedy on the last
    position's logits, read with the public C API (Llama.eval keeps none unless every position's are kept)."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=s["gguf"], n_ctx=s["prompt_tokens"] + s["tokens"] + 8, n_batch=512,
                          n_threads=s["threads"], n_threads_batch=s["threads"], verbose=False)
    vocab = llm.n_vocab()

    def generate(ids: list[int], n: int) -> Timed:
        llm.reset()
        out: list[int] = []
        times: list[float] = []
        step = ids
        for _ in range(n):
            llm.eval(step)
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))
            step = [int(np.argmax(logits))]
            out += step
            times.append(time.perf_counter())
        return out, times
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
        tokens, times = generate(prompt, s["tokens"])
        ttft = times[0] - t0
        samples.append({"ttft_s": ttft, "prefill_tok_s": len(prompt) / ttft,
                        "decode_tok_s": (len(times) - 1) / (times[-1] - times[0])})
    rss_end = _rss()  # the kernel updates ru_maxrss lazily: it can lag the current RSS by a few pages
    return {"load_s": load_s, "rss_loaded": rss_loaded, "rss_end": rss_end,
            "peak_rss": max(rss_end, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
            "samples": samples, "tokens": tokens[:8],
            "stats": stats()}


def main() -> None:
    name, path, settings = sys.argv[1], Path(sys.argv[2]), json.loads(sys.argv[3])
    print(json.dumps(measure(CONTENDERS[name], path, settings)))


if __name__ == "__main__":
    main()
