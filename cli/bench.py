"""offload-bench: the benchmarks that check our speed and memory targets (results go to BENCHMARKS.md)."""
from __future__ import annotations

from pathlib import Path

import typer

from offload.bench.cache_sim import app as cache_sim_app

app = typer.Typer(add_completion=False, help=__doc__, no_args_is_help=True)
app.add_typer(cache_sim_app, name="cache-sim")


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
                                                "deepseek_v2 (2B, DeepSeek-V2-Lite's layout) or glm4_moe (2B, "
                                                "GLM-4.5-Air's layout).")) -> None:
    """Decode and prefill tok/s, time to first token, load time, peak RSS and roofline fraction of every contender
    (ours, transformers, transformers + accelerate offload, llama.cpp: built on demand into a cache) on the CPU."""
    from offload.bench.e2e import run

    names = [n.strip() for n in contenders.split(",") if n.strip()] or None
    try:
        run(model, names, rounds, reps, tokens, prompt_tokens, threads, cache_fraction, json_out, shape)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


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
    """Held-out exact match and perplexity per preset, resident and offloaded (Table 1 of the paper)."""
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


def main() -> None:
    from .common import run_app

    run_app(app)


if __name__ == "__main__":
    main()
