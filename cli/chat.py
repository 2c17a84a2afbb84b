"""offload-chat: talk to a model in the terminal (default: the bundled demo model), or one-shot with -p."""
from __future__ import annotations

import sys

from .common import interrupts_deferred, interrupts_exit, run_app

with interrupts_exit():  # Ctrl-C while the command-line libraries import
    import typer
    from rich.console import Console

app = typer.Typer(add_completion=False, help=__doc__)
console = Console(highlight=False)


@app.command()
def chat(
    model: str = typer.Option("demo", "--model", "-m", help="Model directory, hub repo id, or 'demo'."),
    prompt: str | None = typer.Option(None, "--prompt", "-p", help="Answer this one prompt and exit."),
    system: str | None = typer.Option(None, "--system", help="System message for the conversation."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", "-n", min=0),
    temperature: float = typer.Option(0.0, min=0.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0),
    top_k: int = typer.Option(0, min=0),
    seed: int | None = typer.Option(None),
    device: str = typer.Option("auto", help="cpu, cuda, or auto (cuda when available)."),
    quant: str | None = typer.Option(None, help="Quantization preset: a4e2, a4e3, a4e4, nf4 or none."),
    cache_experts: str | None = typer.Option(None, "--cache-experts", help="Expert slots per MoE layer, or "
                                             "'auto' (the planner); default: every expert resident."),
    prefetch: int = typer.Option(1, min=0, help="Later MoE layers whose experts are prefetched."),
    speculative: bool = typer.Option(False, "--mtp", help="MTP speculative decoding (MiMo-V2-Flash)."),
    show_plan: bool = typer.Option(False, "--plan", help="Print the offload plan (with --cache-experts auto)."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    cache = cache_experts if cache_experts in (None, "auto") else _positive_int(cache_experts)
    lm = _load(model, device=device, quant=quant, cache_experts=cache, prefetch=prefetch)
    if show_plan:
        if lm.plan is None:
            raise typer.BadParameter("--plan needs --cache-experts auto (the planner makes the plan)")
        console.print(lm.plan.explain())
    options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
                   speculative="mtp" if speculative else None)
    history = [{"role": "system", "content": system}] if system else []
    if prompt is not None:
        _answer(lm, history + [{"role": "user", "content": prompt}], options)
        return
    console.print(f"[bold]offload-chat[/bold] · {lm.spec.model_type} from {lm.path} · "
                  "/reset clears the conversation, /exit or Ctrl-D quits")
    while True:
        try:
            text = console.input("[bold green]you> [/bold green]")
        except EOFError:
            console.print()
            return
        if text.strip() in ("/exit", "/quit"):
            return
        if text.strip() == "/reset":
            history = history[:1] if system else []
            continue
        if text.strip():
            history.append({"role": "user", "content": text})
            history.append({"role": "assistant", "content": _answer(lm, history, options, label="model> ")})


def _load(model: str, **options):
    """offload.load behind a progress display on stderr (a terminal only; gone once loaded): the imports
    take a second or two, and a first quantized load of a large model minutes."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    import offload

    stderr = Console(stderr=True)
    if not stderr.is_terminal:  # a pipe or a file gets no display (rich would still write a newline)
        _import_native_libraries()
        return offload.load(model, **options)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=stderr, transient=True) as display:
        task = display.add_task(f"loading {model}", total=None)

        def report(stage: str, done: int, total: int) -> None:
            display.update(task, description=stage, completed=done, total=total)

        _import_native_libraries()
        return offload.load(model, progress=report, **options)


def _import_native_libraries() -> None:
    """torch and the Rust-backed tokenizer and safetensors libraries, imported with Ctrl-C held until they are
    (common.interrupts_deferred)."""
    with interrupts_deferred():
        import safetensors  # noqa: F401
        import tokenizers  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise typer.BadParameter(f"--cache-experts must be 'auto' or an integer >= 1, got {text!r}")
    return int(text)


def _answer(lm, messages: list[dict], options: dict, label: str = "") -> str:
    """Stream the reply to stdout; use the chat template when the tokenizer has one."""
    prompt = messages if lm.tokenizer.chat_template else messages[-1]["content"]
    if label:
        console.print(f"[bold cyan]{label}[/bold cyan]", end="")
    pieces = []
    for piece in lm.generate(prompt, stream=True, **options):
        pieces.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return "".join(pieces)


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
