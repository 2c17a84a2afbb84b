"""offload-bench: the benchmarks that check our speed and memory targets (results go to BENCHMARKS.md)."""
from __future__ import annotations

from pathlib import Path

import typer

from offload.bench.cache_sim import app as cache_sim_app

app = typer.Typer(add_completion=False, help=__doc__, no_args_is_help=True)
app.add_typer(cache_sim_app, name="cache-sim")


@app.command()
def kernels(quick: bool = typer.Option(False, help="Smaller, faster run (not for reported figures)."),
            json_out: Path | None = typer.Option(None, "--json", help="Also write the results here.")) -> None:
    """Quantization error vs hqq, CPU GEMV speed vs bitsandbytes NF4 and dense bf16, bits/param."""
    from offload.bench.kernels import run

    run(json_out=str(json_out) if json_out else None, quick=quick)


@app.command()
def e2e(model: Path | None = typer.Option(None, help="Checkpoint dir (default: a generated OLMoE-shaped one)."),
        tokens: int = typer.Option(32, min=2), runs: int = typer.Option(5, min=1),
        cache_fraction: float = typer.Option(0.25, min=0.0, max=1.0),
        transformers: bool = typer.Option(True, help="Also time transformers on the same checkpoint."),
        json_out: Path | None = typer.Option(None, "--json")) -> None:
    """Decode tok/s: resident vs offloaded (cache_fraction of the experts) vs transformers, CPU."""
    from offload.bench.e2e import run

    run(model, tokens, runs, cache_fraction, transformers, json_out)


def main() -> None:
    from .common import run_app

    run_app(app)


if __name__ == "__main__":
    main()
