"""offload-serve: an OpenAI-compatible HTTP server for one model (default: the bundled demo model), on
127.0.0.1 unless --host says otherwise. Ctrl-C or SIGTERM stops it (exit 0)."""
from __future__ import annotations

from pathlib import Path

from .common import CacheExperts, Debug, Device, Model, Mtp, Prefetch, Quant, interrupts_exit, run_app

with interrupts_exit():  # Ctrl-C while the command-line libraries import
    import typer

    from .loading import load_model

app = typer.Typer(add_completion=False, help=__doc__)


@app.command()
def serve(
    model: Model = "demo",
    host: str = typer.Option("127.0.0.1", help="Address to listen on; 0.0.0.0 serves every network."),
    port: int = typer.Option(8080, min=0, max=65535),
    max_tokens: int = typer.Option(1024, "--max-tokens", min=1, help="Most tokens one request may generate "
                                   "(a request asking more gets a 400); also the default when it names none."),
    max_request_bytes: int = typer.Option(1 << 20, "--max-request-bytes", min=1,
                                          help="Largest request body (a larger one gets a 413)."),
    max_queue: int = typer.Option(64, "--max-queue", min=1, help="Requests that may wait for the model "
                                  "(one more gets a 503)."),
    device: Device = "auto",
    quant: Quant = None,
    cache_experts: CacheExperts = None,
    prefetch: Prefetch = 1,
    speculative: Mtp = False,
    debug: Debug = False,
) -> None:
    lm = load_model(model, device=device, quant=quant, cache_experts=cache_experts, prefetch=prefetch)
    lm.tokenizer  # noqa: B018 - load it now: a broken tokenizer is a start-up error, not every request's
    if speculative:
        lm.mtp_head  # noqa: B018 - likewise a model without an MTP layer
    from offload.serve.app import Limits
    from offload.serve.server import serve as run

    name = Path(model).name if Path(model).is_dir() else model
    run(lm, name, host, port, Limits(max_tokens, max_request_bytes, max_queue), speculative)


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
