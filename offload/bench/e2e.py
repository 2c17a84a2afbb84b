"""End-to-end decode speed on the CPU (or a GPU: device="cuda"): fully resident vs offloaded (a quarter of the
experts cached, next-layer
prefetch) vs transformers, on one OLMoE-shaped checkpoint, in one process, medians of several runs.

The checkpoint (random weights, real layout: 1.74B params, 64 experts top-8, hidden 1024, 16 layers, expert
width 512, 302M active) is written once to a cache directory; it is far larger than the CPU cache.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

OLMOE_1B = dict(model_type="olmoe", vocab_size=32000, hidden_size=1024, intermediate_size=512, num_hidden_layers=16,
                num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
                max_position_embeddings=4096, bos_token_id=None, eos_token_id=None, pad_token_id=0)
DEFAULT_DIR = Path.home() / ".cache" / "moe-offload" / "bench-olmoe-1.7b"


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


def _decode_tok_s(generate, prompt: torch.Tensor, tokens: int, runs: int) -> float:
    """Decode tokens/s excluding the prefill: (tokens-1) / (t(tokens) - t(1)), median over runs."""
    rates = []
    generate(prompt, 2)
    for _ in range(runs):
        t0 = time.perf_counter()
        generate(prompt, 1)
        t1 = time.perf_counter()
        generate(prompt, tokens)
        t2 = time.perf_counter()
        rates.append((tokens - 1) / max(1e-9, (t2 - t1) - (t1 - t0)))
    return statistics.median(rates)


def run(path: Path | None = None, tokens: int = 32, runs: int = 5, cache_fraction: float = 0.25,
        with_transformers: bool = True, json_out: Path | None = None, device: str = "cpu") -> dict:
    import offload

    path = make_checkpoint(path or DEFAULT_DIR)
    prompt = torch.randint(1, 32000, (1, 16), generator=torch.Generator().manual_seed(0)).to(device)
    results: dict[str, dict] = {}
    setups = [("resident", {}), ("offloaded-cpu-miss", {"miss_policy": "auto"}),
              ("offloaded-load-miss", {"miss_policy": "load"})]
    k = 0
    for label, kw in setups:
        if kw:
            kw |= {"cache_experts": k, "prefetch": 1}
        model = offload.load(path, device=device, **kw)
        k = k or max(1, round(cache_fraction * model.spec.router.num_experts))
        results[label] = {"tok_s": _decode_tok_s(lambda p, n, m=model: m.generate(p, max_new_tokens=n), prompt,
                                                 tokens, runs)}
        if kw:
            stats = model.stats()
            results[label] |= {"cache_experts": k, "hit_rate": stats["hit_rate"],
                               "prediction_recall": stats["prediction_recall"]}
        del model
    if with_transformers:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()

        def hf_generate(p, n):
            with torch.inference_mode():
                return hf.generate(p, max_new_tokens=n, min_new_tokens=n, do_sample=False)

        results["transformers"] = {"tok_s": _decode_tok_s(hf_generate, prompt, tokens, runs)}
    base = results["resident"]["tok_s"]
    for r in results.values():
        r["vs_resident"] = r["tok_s"] / base
    where = f"CPU, {torch.get_num_threads()} threads" if device == "cpu" else torch.cuda.get_device_name(device)
    _print(results, where)
    if json_out:
        Path(json_out).write_text(json.dumps(results, indent=2))
    return results


def _print(results: dict, where: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"decode tok/s, OLMoE-shaped 1.74B bf16, {where}")
    for col in ("setup", "tok/s", "vs resident", "hit rate", "prediction recall"):
        table.add_column(col)
    for name, r in results.items():
        table.add_row(name, f"{r['tok_s']:.2f}", f"{r['vs_resident']:.2f}x",
                      f"{r['hit_rate']:.2f}" if "hit_rate" in r else "-",
                      f"{r['prediction_recall']:.2f}" if "prediction_recall" in r else "-")
    Console().print(table)
