"""offload-bench: the benchmarks that check our speed and memory targets (results go to BENCHMARKS.md)."""
from __future__ import annotations

from pathlib import Path

import typer

from offload.bench.cache_sim import cache_sim

app = typer.Typer(add_completion=False, help=__doc__, no_args_is_help=True)
app.command("cache-sim")(cache_sim)  # a command, not a group: its usage line has no COMMAND [ARGS]


@app.command()
def kernels(quick: bool = typer.Option(False, help="Smaller, faster run (not for reported figures)."),
            speed_only: bool = typer.Option(False, help="Only the GEMV timings (skips hqq's slow optimizer)."),
            threads: int = typer.Option(0, min=0, help="torch threads (0: torch's default)."),
            rows: int = typer.Option(1, min=1, max=8, help="x rows of the timed GEMV (1: decode)."),
            json_out: Path | None = typer.Option(None, "--json", help="Also write the results here.")) -> None:
    """Quantization error vs hqq, CPU GEMV speed vs bitsandbytes NF4 and dense bf16, bits/param."""
    import torch

    from offload.bench.kernels import run

    if threads:
        torch.set_num_threads(threads)
    run(json_out=str(json_out) if json_out else None, quick=quick, speed_only=speed_only, rows=rows)


@app.command("gpu-kernels")
def gpu_kernels(quick: bool = typer.Option(False, help="Smaller, faster run (not for reported figures)."),
                json_out: Path | None = typer.Option(None, "--json", help="Also write the results here.")) -> None:
    """CUDA only: Triton kernels vs torch bf16 (decode and prefill shapes), host<->device copy bandwidth."""
    from offload.bench.gpu_kernels import run

    run(json_out=str(json_out) if json_out else None, quick=quick)


@app.command()
def e2e(model: Path | None = typer.Option(None, help="Checkpoint dir (default: a generated OLMoE-shaped one)."),
        contenders: str = typer.Option("", help="Comma-separated subset (default: all): ours-resident-bf16, "
                                                "ours-resident-a4e4, ours-resident-a4e2, ours-offloaded-bf16, "
                                                "ours-offloaded-a4e2, transformers, transformers-accelerate, "
                                                "llama.cpp-bf16, llama.cpp-q4_0."),
        rounds: int = typer.Option(3, min=1, help="Interleaved rounds, one process per contender each."),
        reps: int = typer.Option(2, min=1, help="Timed repetitions per process."),
        tokens: int = typer.Option(64, min=2, help="Greedy tokens per timed generation."),
        prompt_tokens: int = typer.Option(32, min=1),
        threads: int = typer.Option(2, min=1, help="Threads of every contender."),
        cache_fraction: float = typer.Option(0.25, min=0.0, max=1.0, help="Experts kept by offloaded contenders."),
        json_out: Path | None = typer.Option(None, "--json"),
        shape: str = typer.Option("olmoe", help="Generated checkpoint when no --model: olmoe (1.74B, 64 experts), "
                                                "qwen3_5_moe (1.75B, Qwen3.5-35B-A3B's proportions), deepseek_v2 "
                                                "(2B, DeepSeek-V2-Lite's layout) or glm4_moe (2B, GLM-4.5-Air's "
                                                "layout)."),
        device: str = typer.Option("cpu", help="Where ours and transformers compute (cuda: llama.cpp and "
                                               "accelerate's disk offload, CPU-only, are skipped).")) -> None:
    """Decode and prefill tok/s, time to first token, load time, peak RSS and roofline fraction of every contender
    (ours, transformers, transformers + accelerate offload, llama.cpp: built on demand into a cache), on the CPU
    unless --device says otherwise."""
    from offload.bench.e2e import run

    names = [n.strip() for n in contenders.split(",") if n.strip()] or None
    try:
        run(model, names, rounds, reps, tokens, prompt_tokens, threads, cache_fraction, json_out, shape, device)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


@app.command()
def deltanet(prompt: int = typer.Option(512, min=1, help="Prompt tokens of the chunked (prefill) form."),
             heads: int = typer.Option(32, min=1, help="Value heads (Qwen3.5-35B-A3B: 32)."),
             runs: int = typer.Option(5, min=1, help="Timed runs each (median), after a warm-up, interleaved."),
             threads: int = typer.Option(2, min=1),
             json_out: Path | None = typer.Option(None, "--json")) -> None:
    """The gated delta rule of one Gated DeltaNet layer (Qwen3.5-MoE), ours against transformers' torch path:
    chunked prefill tokens/s and recurrent decode steps/s on the CPU."""
    import json

    from offload.bench.linear_attention import run

    results = run(prompt, heads, runs=runs, threads=threads)
    print(json.dumps(results, indent=2))
    if json_out:
        json_out.write_text(json.dumps(results, indent=2))


@app.command()
def profile(model: Path | None = typer.Option(None, help="Checkpoint dir (default: e2e's OLMoE-shaped one)."),
            tokens: int = typer.Option(16, min=1, help="Decode tokens per timed run."),
            runs: int = typer.Option(5, min=1, help="Unprofiled timing runs (median)."),
            threads: int = typer.Option(2, min=1), top: int = typer.Option(15, min=0, help="cProfile rows."),
            compile_dense: bool = typer.Option(False, "--compile", help="torch.compile the dense step's norms and "
                                                                             "rope (reports the compile time)."),
            json_out: Path | None = typer.Option(None, "--json")) -> None:
    """Torch ops and time per decode token by category (attention, norms/rope, router, experts, LM head, Python),
    resident on the CPU, and cProfile's top functions."""
    from offload.bench.profile import run

    run(model, tokens, runs, threads, top, json_out, compile_dense)


@app.command()
def quality(model: str = typer.Option("demo", help="A checkpoint with the demo tasks' chat format."),
            n: int = typer.Option(200, min=1, help="Held-out tasks."),
            json_out: Path | None = typer.Option(None, "--json")) -> None:
    """Held-out exact match (first turn, later turns, unseen phrasings; per task kind) and perplexity per preset,
    resident and offloaded (Table 1 of the paper). Prints a line per step to stderr."""
    from offload.bench.quality import run

    run(model, n, json_out)


@app.command()
def speculative(model: str = typer.Option("demo"), prompts: int = typer.Option(50, min=1),
                max_new_tokens: int = typer.Option(48, min=2), draft_tokens: int = typer.Option(3, min=1),
                runs: int = typer.Option(5, min=1), device: str = typer.Option("cpu", help="cpu, or cuda."),
                json_out: Path | None = typer.Option(None, "--json")) -> None:
    """MTP speculation: acceptance, tokens/forward, expert loads/token, tok/s with and without speculation."""
    from offload.bench.speculative import run

    run(model, prompts, max_new_tokens, draft_tokens, runs, json_out, device)


@app.command()
def routing(model: str = typer.Option("demo"), prompts: int = typer.Option(50, min=1),
            capacity: int = typer.Option(4, min=1), trace: Path = typer.Option(Path("demo-routing.jsonl")),
            json_out: bool = typer.Option(False, "--json")) -> None:
    """Record a routing trace on a trained model; prediction recall; replay it through every cache policy."""
    from offload.bench.routing import run

    run(model, prompts, capacity, trace=trace, json_out=json_out)


@app.command()
def startup(venv: Path | None = typer.Option(None, help="A venv with moe-offload installed (default: this one)."),
            runs: int = typer.Option(5, min=1), json_out: Path | None = typer.Option(None, "--json")) -> None:
    """Wall time of `import offload`, each command's --help and a one-shot demo chat, in fresh processes."""
    from offload.bench.startup import run

    run(venv, runs, str(json_out) if json_out else None)


@app.command()
def load(model: Path | None = typer.Option(None, help="Checkpoint dir (default: e2e's generated OLMoE-shaped one)."),
         packed: Path | None = typer.Option(None, help="Its offload-convert --quant a4e2 output, for the packed rows."),
         runs: int = typer.Option(3, min=1), cached: int = typer.Option(16, min=1, help="Expert slots per layer."),
         threads: int = typer.Option(2, min=1), only: list[str] = typer.Option([], help="Setups whose name has this."),
         json_out: Path | None = typer.Option(None, "--json")) -> None:
    """offload.load in fresh processes: load time, peak and steady RSS (resident/offloaded, bf16/4-bit, packed)."""
    from offload.bench.e2e import DEFAULT_DIR, make_checkpoint
    from offload.bench.load import run

    run(make_checkpoint(model or DEFAULT_DIR), packed, runs, cached, threads, only, json_out)


@app.command()
def fuzz(target: list[str] = typer.Option(["all"], help="Fuzz target (repeatable): safetensors, index, packed, "
                                                        "any registered one, or all."),
         cases: int = typer.Option(100_000, min=1, help="Cases in all, shared evenly by the targets."),
         seed: int = typer.Option(0), limit: float = typer.Option(10.0, help="Seconds one case may take."),
         json_out: Path | None = typer.Option(None, "--json")) -> None:
    """Property-based fuzzing of the parsers of files users hand us: each damaged file must load right or fail with
    a one-line error (exit 1 when a case does neither)."""
    try:
        from offload.bench.fuzz import run
    except ImportError as e:
        raise RuntimeError(f"offload-bench fuzz needs {e.name}: pip install 'moe-offload[dev]'") from None
    if any(report.failures for report in run(target, cases, seed, limit, json_out)):
        raise typer.Exit(1)


@app.command()
def soak(model: str = typer.Option("demo"), tokens: int = typer.Option(2000, min=1, help="Tokens to generate."),
         step: int = typer.Option(100, min=1, help="Tokens per generate call (EOS ignored)."),
         cycles: int = typer.Option(100, min=1, help="Load/unload cycles."),
         cache_experts: int = typer.Option(4, min=0, help="Expert slots per layer (0: all resident)."),
         json_out: Path | None = typer.Option(None, "--json")) -> None:
    """Leaks over a long run: RSS slope, threads and open files over generated tokens, RSS over load cycles."""
    from offload.bench.soak import run

    run(model, tokens, step, cycles, cache_experts or None, json_out)


@app.command()
def split(model: Path | None = typer.Option(None, help="Checkpoint dir (default: e2e's generated OLMoE-shaped one)."),
          device: str = typer.Option("cuda"), quant: str | None = typer.Option(None, help="Preset, e.g. a4e2."),
          cache_fraction: float = typer.Option(0.25, min=0.0, max=1.0, help="Expert slots a layer, as a fraction."),
          tokens: int = typer.Option(32, min=2), runs: int = typer.Option(3, min=1),
          json_out: Path | None = typer.Option(None, "--json")) -> None:
    """The CPU + GPU split against resident, copied misses and the caller's CPU misses (one process, interleaved)."""
    from offload.bench.e2e import DEFAULT_DIR, make_checkpoint
    from offload.bench.split import run

    run(model or make_checkpoint(DEFAULT_DIR), device, quant, cache_fraction, tokens, runs=runs, json_out=json_out)


@app.command()
def simulate(trace: list[Path] = typer.Option(..., "--trace", exists=True, dir_okay=False,
                                              help="Mixtral-8x7B routing trace (repeatable; the first is scored, "
                                                   "the others give the split's hot experts)."),
             json_out: Path | None = typer.Option(None, "--json", help="Also write the results here.")) -> None:
    """A simulation: fit on the offloading paper's T4/RTX 3060 rows, check its A100/RTX 3080 Mobile rows, then
    predict our engine (slots + prefetch, the CPU+GPU split; eager and with graphs) on a T4, RTX 3060 and RTX 4090."""
    from offload.bench.simulate import run

    run(trace, json_out)


def main() -> None:
    from .common import run_app

    run_app(app)


if __name__ == "__main__":
    main()
