"""`offload-bench e2e`: the contenders on one checkpoint, same prompt, greedy, batch 1, same threads, each in its own
process, interleaved over rounds: ours (resident and offloaded, bf16 and 4/2-bit), transformers, transformers +
accelerate offloading at the same memory budget, llama.cpp BF16 and Q4_0 (offload.bench.contenders).

The default checkpoint (random weights, real layout: 1.74B params, 64 experts top-8, hidden 1024, 16 layers,
expert width 512, 302M active) is written once to a cache directory; it is far larger than the CPU cache. Each
contender's decode rate is also given as a fraction of the memory-bandwidth roofline: the bytes it reads per
token divided by the streaming-read bandwidth measured in the same run.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from offload.bench.contenders import CONTENDERS

OLMOE_1B = dict(model_type="olmoe", vocab_size=32000, hidden_size=1024, intermediate_size=512, num_hidden_layers=16,
                num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
                max_position_embeddings=4096, bos_token_id=None, eos_token_id=None, pad_token_id=0)
DEFAULT_DIR = Path.home() / ".cache" / "moe-offload" / "bench-olmoe-1.7b"
# Qwen3.5-35B-A3B's proportions at 1.75B params: 256 experts top-8 with a gated shared expert, expert width a
# quarter of hidden, 3 Gated DeltaNet layers to 1 gated full-attention layer, q width 2x hidden, 8:1 GQA, value
# heads 2x key heads (head dims 128); hidden 1024 (half), 8 layers (40 there), a 32k vocabulary (248k there).
# 156M params read per decoded token, 8.9% of the total (8.6% there).
QWEN3_5_2B = dict(model_type="qwen3_5_moe_text", vocab_size=32000, hidden_size=1024, num_hidden_layers=8,
                  num_attention_heads=16, num_key_value_heads=2, head_dim=128, linear_num_key_heads=8,
                  linear_num_value_heads=16, linear_key_head_dim=128, linear_value_head_dim=128,
                  linear_conv_kernel_dim=4, num_experts=256, num_experts_per_tok=8, moe_intermediate_size=256,
                  shared_expert_intermediate_size=256, max_position_embeddings=4096, bos_token_id=None,
                  eos_token_id=None, pad_token_id=0)
# DeepSeek-V2-Lite's and GLM-4.5-Air's layouts at ~2B parameters, random weights as OLMOE_1B's: MLA (latent 256,
# rotary key 32, q without LoRA), 64 experts top-6 and 2 shared experts; partial rotary, q/k/v biases, 8:1 GQA,
# 128 experts top-8 and one shared; hidden 1024, 20 layers, the first dense, a 32k vocabulary.
SPECIAL = dict(max_position_embeddings=4096, bos_token_id=None, eos_token_id=None, pad_token_id=0)
V2_LITE_2B = dict(model_type="deepseek_v2", vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                  num_hidden_layers=20, num_attention_heads=8, q_lora_rank=None, kv_lora_rank=256, qk_rope_head_dim=32,
                  qk_nope_head_dim=64, v_head_dim=64, n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2,
                  moe_intermediate_size=512, first_k_dense_replace=1, topk_method="greedy", **SPECIAL)
GLM_AIR_2B = dict(model_type="glm4_moe", vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                  num_hidden_layers=20, num_attention_heads=16, num_key_value_heads=2, head_dim=64,
                  partial_rotary_factor=0.5, attention_bias=True, n_routed_experts=128, num_experts_per_tok=8,
                  n_shared_experts=1, moe_intermediate_size=256, first_k_dense_replace=1, **SPECIAL)
SHAPES = {"olmoe": (OLMOE_1B, DEFAULT_DIR),
          "qwen3_5_moe": (QWEN3_5_2B, DEFAULT_DIR.with_name("bench-qwen3_5_moe-1.75b")),
          "deepseek_v2": (V2_LITE_2B, DEFAULT_DIR.with_name("bench-v2-lite-2b")),
          "glm4_moe": (GLM_AIR_2B, DEFAULT_DIR.with_name("bench-glm-air-2b"))}


def routed_experts(config: dict) -> int:
    return config.get("num_experts") or config["n_routed_experts"]


def make_checkpoint(path: Path, config: dict = OLMOE_1B, shard_bytes: int = 1 << 30) -> Path:
    """Random bf16 weights under transformers' names and shapes, sharded, written atomically."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    if (path / "config.json").is_file():
        return path
    cfg = AutoConfig.for_model(**config)
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in AutoModelForCausalLM.from_config(cfg).state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    weight_map, shard, size, index = {}, {}, 0, 0

    def flush() -> None:
        nonlocal shard, size, index
        name = f"model-{index:05d}.safetensors"
        save_file(shard, tmp / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        shard, size, index = {}, 0, index + 1

    for name, shape in shapes.items():
        per_expert = name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj")
        if per_expert:  # transformers saves experts one by one: model.layers.N.mlp.experts.E.{gate,up,down}_proj
            prefix = name.rsplit(".", 1)[0]
            for e in range(shape[0]):
                if name.endswith("gate_up_proj"):
                    half = shape[1] // 2
                    shard[f"{prefix}.{e}.gate_proj.weight"] = torch.randn(half, shape[2], generator=g).bfloat16() * 0.02
                    shard[f"{prefix}.{e}.up_proj.weight"] = torch.randn(half, shape[2], generator=g).bfloat16() * 0.02
                else:
                    shard[f"{prefix}.{e}.down_proj.weight"] = torch.randn(*shape[1:], generator=g).bfloat16() * 0.02
            size += 2 * shape.numel()
        else:
            is_norm = len(shape) == 1
            shard[name] = (torch.ones(shape) if is_norm else torch.randn(*shape, generator=g) * 0.02).bfloat16()
            size += 2 * shape.numel()
        if size >= shard_bytes:
            flush()
    if shard:
        flush()
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg.dtype = "bfloat16"
    cfg.save_pretrained(tmp)
    tmp.rename(path)
    return path


def active_bytes(config: dict, quant: str) -> int:
    """Weight bytes one decoded token reads in our layout: every tensor the model has (at the preset's stored size
    for the roles it quantizes, 16-bit otherwise) but the experts not routed to and the embedding table, of which
    it reads one row."""
    from offload.archs import read_spec
    from offload.quant import get_preset
    from offload.quantize import role_spec

    preset = get_preset("none" if quant == "bf16" else quant)
    spec = read_spec(config)[1]
    dense = experts = 0
    for name, shape in spec.expected_shapes().items():
        stored = role_spec(preset, name)
        size = stored.nbytes(shape) if stored is not None else 2 * math.prod(shape)
        if name == "embed":
            dense += 2 * shape[1] + (size if spec.tie_word_embeddings else 0)
        elif ".experts." in name:
            experts += size
        else:
            dense += size
    return dense + experts * spec.router.top_k // spec.router.num_experts


def _subprocess(args: list[str], threads: int, pythonpath: str | None = None, timeout: float = 3600) -> str:
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH", "")) if p)
    done = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env, timeout=timeout)
    if done.returncode:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"exit {done.returncode}: {tail}")
    return done.stdout.strip().splitlines()[-1]


def _prepare_llama_cpp(names: list[str], path: Path, settings: dict, skipped: dict[str, str]) -> None:
    """Build llama-cpp-python and convert the checkpoint once (cached); a contender that cannot be had is skipped
    with the reason."""
    from offload.bench import llama_cpp

    for name in names:
        c = CONTENDERS[name]
        if not c.needs_build:
            continue
        try:
            gguf = llama_cpp.ensure_gguf(path, c.quant)
            active, _ = llama_cpp.gguf_active_bytes(gguf)
            settings[name] = {"gguf": str(gguf), "active_bytes": active,
                              "pythonpath": str(llama_cpp.site_dir())}
        except (llama_cpp.Unavailable, OSError, subprocess.TimeoutExpired) as e:
            skipped[name] = str(e)


def _prepare_packs(names: list[str], path: Path, settings: dict, skipped: dict[str, str]) -> None:
    """Our quantized contenders load a packed checkpoint (`offload-convert --quant`), converted once beside the
    checkpoint and cached, as llama.cpp loads its converted GGUF: the load time is then a load, not a quantization."""
    from offload.packed import convert

    for name in names:
        c = CONTENDERS[name]
        if c.kind != "ours" or c.quant == "bf16":
            continue
        packed = path.with_name(f"{path.name}-{c.quant}")
        try:
            if not (packed / "config.json").is_file():
                print(f"converting {path.name} to a packed {c.quant} checkpoint (once)", file=sys.stderr)
                convert(path, packed, quant=c.quant)
            settings[name] = {"packed": str(packed)}
        except (OSError, ValueError) as e:
            skipped[name] = f"cannot convert to {c.quant}: {e}"


def _summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run(path: Path | None = None, contenders: list[str] | None = None, rounds: int = 3, reps: int = 2,
        tokens: int = 64, prompt_tokens: int = 32, threads: int = 2, cache_fraction: float = 0.25,
        json_out: Path | None = None, shape: str = "olmoe", device: str = "cpu") -> dict:
    """`shape`: the generated checkpoint used when `path` is None (SHAPES). `device`: where ours and transformers
    compute (a GPU: the CPU-only contenders, llama.cpp and accelerate's disk offload, are skipped)."""
    names = contenders or list(CONTENDERS)
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        raise ValueError(f"unknown contender(s) {unknown}; choose from {list(CONTENDERS)}")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {list(SHAPES)}")
    config, directory = SHAPES[shape]
    path = make_checkpoint(path or directory, config)
    config = json.loads((path / "config.json").read_text())
    g = torch.Generator().manual_seed(0)
    common = {"prompt": torch.randint(3, config["vocab_size"], (prompt_tokens,), generator=g).tolist(),
              "tokens": tokens, "prompt_tokens": prompt_tokens, "threads": threads, "reps": reps,
              "cache_experts": max(1, round(cache_fraction * routed_experts(config))), "device": device}
    skipped: dict[str, str] = {n: f"runs on the CPU only, not on {device}" for n in names
                               if device != "cpu" and CONTENDERS[n].kind in ("llama.cpp", "accelerate")}
    skipped |= {n: "the same as ours-resident-bf16 on a CPU (CUDA graphs need a GPU)" for n in names
                if device == "cpu" and "cuda_graphs" in CONTENDERS[n].options}
    names = [n for n in names if n not in skipped]
    extra: dict[str, dict] = {}
    _prepare_llama_cpp(names, path, extra, skipped)
    _prepare_packs(names, path, extra, skipped)
    live = [n for n in names if n not in skipped]
    raw: dict[str, list[dict]] = {n: [] for n in live}
    errors: dict[str, list[str]] = {n: [] for n in live}
    bandwidth: list[float] = []
    load: list[float] = []
    head = {"checkpoint": str(path), "device": device, "threads": threads, "prompt_tokens": prompt_tokens, "tokens": tokens,
            "rounds": rounds, "reps": reps, "cache_experts": common["cache_experts"], "prompt": common["prompt"]}
    for r in range(rounds):
        load.append(os.getloadavg()[0])
        bandwidth.append(float(_subprocess(["offload.bench.bandwidth", str(threads)], threads)) * 1e9)
        turn = r % max(1, len(live))
        for name in live[turn:] + live[:turn]:  # rotated: no contender always runs first
            settings = common | extra.get(name, {})
            print(f"round {r + 1}/{rounds}: {name}", file=sys.stderr)
            try:
                raw[name].append(json.loads(_subprocess(["offload.bench.contenders", name, str(path),
                                                         json.dumps(settings)], threads, settings.get("pythonpath"))))
            except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as e:
                errors[name].append(str(e))
        load.append(os.getloadavg()[0])
        results = head | {"rounds_done": r + 1, "load_average_1min": load} | _summarize(
            config, raw, errors, extra, skipped, bandwidth)
        if json_out:  # after every round: a long run that is stopped keeps what it measured
            Path(json_out).write_text(json.dumps(results, indent=2))
    _print(results)
    return results


def _summarize(config: dict, raw: dict[str, list[dict]], errors: dict[str, list[str]], extra: dict[str, dict],
               skipped: dict[str, str], bandwidth: list[float]) -> dict:
    """Medians and ranges over every sample of every round, and each contender's fraction of the roofline."""
    bw = statistics.median(bandwidth)
    contenders, skipped = {}, dict(skipped)
    for name, runs in raw.items():
        if not runs:
            skipped[name] = "every run failed: " + "; ".join(errors[name][:1])
            continue
        c = CONTENDERS[name]
        active = extra.get(name, {}).get("active_bytes") or active_bytes(config, c.quant if c.kind == "ours"
                                                                         else "bf16")
        samples = [s for run_ in runs for s in run_["samples"]]
        decode = _summary([s["decode_tok_s"] for s in samples])
        contenders[name] = {
            "decode_tok_s": decode, "prefill_tok_s": _summary([s["prefill_tok_s"] for s in samples]),
            "ttft_s": _summary([s["ttft_s"] for s in samples]), "load_s": _summary([x["load_s"] for x in runs]),
            "peak_rss": max(x["peak_rss"] for x in runs), "rss_end": statistics.median(x["rss_end"] for x in runs),
            "active_bytes_per_token": active, "roofline_fraction": decode["median"] * active / bw,
            "runs": len(runs), "failed_runs": errors[name], "tokens": runs[0]["tokens"], "stats": runs[-1]["stats"]}
    return {"read_bandwidth": _summary(bandwidth), "contenders": contenders, "skipped": skipped}


COLUMNS = ("contender", "decode tok/s", "prefill tok/s", "TTFT s", "load s", "peak RSS GB", "MB/token", "roofline")


def _rows(results: dict) -> list[list[str]]:
    def span(s: dict, fmt: str = ".1f") -> str:
        return f"{s['median']:{fmt}} ({s['min']:{fmt}}-{s['max']:{fmt}})"

    return [[name, span(r["decode_tok_s"]), span(r["prefill_tok_s"]), span(r["ttft_s"], ".2f"), span(r["load_s"]),
             f"{r['peak_rss'] / 1e9:.2f}", f"{r['active_bytes_per_token'] / 1e6:.0f}", f"{r['roofline_fraction']:.0%}"]
            for name, r in results["contenders"].items()]


def markdown(results: dict) -> str:
    """The table as BENCHMARKS.md keeps it."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in _rows(results)])


def _print(results: dict) -> None:
    """A rich table, the same as markdown, and why any contender was skipped."""
    from rich.console import Console
    from rich.table import Table

    from offload.bench.table import print_table

    bw = [v / 1e9 for v in (results["read_bandwidth"]["min"], results["read_bandwidth"]["max"])]
    load = results["load_average_1min"]
    table = Table(title=f"offload-bench e2e: {Path(results['checkpoint']).name}, {results['prompt_tokens']}-token "
                        f"prompt, {results['tokens']} greedy tokens, {results['threads']} threads, "
                        f"{results['rounds_done']} rounds x {results['reps']} reps; median (min-max); read "
                        f"bandwidth {bw[0]:.1f}-{bw[1]:.1f} GB/s; 1-min load average {min(load):.1f}-{max(load):.1f}")
    for col in COLUMNS:
        table.add_column(col)
    for row in _rows(results):
        table.add_row(*row)
    console = Console()
    print_table(table, console)
    for name, reason in results["skipped"].items():
        console.print(f"skipped {name}: {reason}")
    print(markdown(results))  # to paste into BENCHMARKS.md: never wrapped to the terminal
