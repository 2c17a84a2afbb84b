"""offload-convert: rewrite a checkpoint into the packed layout (one aligned blob per expert, memory-mapped
at load), so models larger than RAM run and experts move to the GPU in one copy each."""
from __future__ import annotations

from pathlib import Path

from .common import interrupts_deferred, interrupts_exit, run_app

with interrupts_exit():  # Ctrl-C while typer imports
    import typer

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def convert(source: str = typer.Argument(..., help="Model directory or hub repo id."),
            dest: Path = typer.Argument(..., help="Output directory (must not exist)."),
            dtype: str | None = typer.Option(None, help="bfloat16, float16 or float32 (default: the checkpoint's)."),
            quant: str | None = typer.Option(None, help="Quantize as written: a preset (a4e2, a4e3, a4e4, nf4); the "
                                                        "packed model then loads without quantizing."),
            debug: bool = typer.Option(False, "--debug", help="Show tracebacks.")) -> None:
    with interrupts_deferred():  # a Ctrl-C while torch starts up is held until it has (common.py)
        import torch

    from offload.packed import convert as run

    torch_dtype = None
    if dtype is not None:
        torch_dtype = getattr(torch, dtype, None)
        if not isinstance(torch_dtype, torch.dtype):
            raise typer.BadParameter(f"unknown dtype {dtype!r}; use bfloat16, float16 or float32")
    out = run(source, dest, torch_dtype, quant)
    typer.echo(f"wrote {out}")


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
