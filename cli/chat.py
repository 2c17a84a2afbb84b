"""offload-chat: talk to a model in the terminal (default: the bundled demo model), or one-shot with -p."""
from __future__ import annotations

import sys
from typing import Annotated

from .common import (CacheExperts, Debug, Device, MaxNewTokens, Model, Mtp, Prefetch, Quant, RepetitionPenalty, Seed,
                     Temperature, TopK, TopP, interrupts_exit, run_app)

with interrupts_exit():  # Ctrl-C while the command-line libraries import
    import typer
    from rich.console import Console
    from rich.markup import escape

    from .chat_commands import is_command, run_command
    from .chat_input import enable_line_editing, read_turn, styled
    from .chat_session import ChatSession, Settings
    from .loading import load_model

app = typer.Typer(add_completion=False, help=__doc__)
console = Console(highlight=False, soft_wrap=True)  # the terminal wraps long lines, as it does the answers


def _prompt_text(value: str | None) -> str | None:
    """-p TEXT, or -p - for the prompt on stdin; an empty prompt is a usage error."""
    if value == "-":
        value = sys.stdin.read()
    if value is not None and not value.strip():
        raise typer.BadParameter("the prompt is empty (give text, or - to read it from stdin)")
    return value


@app.command()
def chat(
    model: Model = "demo",
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", callback=_prompt_text,
                                               help="Answer this one prompt and exit (-: read stdin).")] = None,
    system: Annotated[str | None, typer.Option(help="System message for the conversation.")] = None,
    max_new_tokens: MaxNewTokens = 256,
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    top_k: TopK = 0,
    repetition_penalty: RepetitionPenalty = 1.0,
    seed: Seed = None,
    device: Device = "auto",
    quant: Quant = None,
    cache_experts: CacheExperts = None,
    prefetch: Prefetch = 1,
    mtp: Mtp = False,
    show_plan: Annotated[bool, typer.Option(
        "--plan", help="Print the offload plan (with --cache-experts auto).")] = False,
    debug: Debug = False,
    token_delay: Annotated[float, typer.Option(hidden=True, min=0.0, help="Test only: seconds slept after each piece "
                                               "of an answer, so that a test can interrupt it.")] = 0.0,
) -> None:
    lm = load_model(model, device=device, quant=quant, cache_experts=cache_experts, prefetch=prefetch)
    if show_plan:
        if lm.plan is None:
            raise typer.BadParameter("--plan needs --cache-experts auto (the planner makes the plan)")
        console.print(lm.plan.explain())
    settings = Settings(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, mtp)
    session = ChatSession(lm, settings, system, console, token_delay)
    if prompt is not None:  # one-shot: the answer alone on stdout; Ctrl-C ends the command (exit 130)
        session.stream([*session.conversation(), {"role": "user", "content": prompt}], [])
        return
    _converse(session, f"{lm.spec.model_type} from {lm.path}")


def _converse(session: ChatSession, what: str) -> None:
    """The prompt loop: slash commands, or a turn for the model. Ctrl-D ends it (exit 0); Ctrl-C at the prompt
    ends the command (exit 130)."""
    enable_line_editing()
    console.print(f"[bold]offload-chat[/bold] · {escape(what)} · /help lists the commands, Ctrl-D quits")
    prompt, more = styled(console, "you> ", "bold green"), styled(console, "...  ", "dim")
    while True:
        try:
            text = read_turn(prompt, more)
        except EOFError:
            console.print()
            return
        if is_command(text):
            if not run_command(session, text):
                return
        elif text.strip():
            session.ask(text.removeprefix("/"))


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
