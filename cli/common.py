"""What every console script shares: exit codes and one-line errors instead of tracebacks, Ctrl-C at any
moment as exit 130, and the model and sampling options of offload-chat (offload-serve takes the same ones).
Imports only typer (guarded by `interrupts_exit`, like each script's own imports)."""
from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, NoReturn

EXIT_RUNTIME = 1  # typer/click already exit 2 on usage errors
EXIT_INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a command that Ctrl-C ended


def interrupted() -> NoReturn:
    print("interrupted", file=sys.stderr)
    sys.exit(EXIT_INTERRUPTED)


@contextmanager
def interrupts_exit() -> Iterator[None]:
    """Ctrl-C inside (say, while a script's libraries import): one line on stderr and exit 130, no traceback."""
    try:
        yield
    except KeyboardInterrupt:
        interrupted()


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C until the block ends, then raise it. For imports of native libraries: a KeyboardInterrupt
    raised while torch starts up is at times lost (the command runs on) and at times aborts the process from
    C++ (pybind11::error_already_set, SIGABRT)."""
    held = []
    previous = signal.signal(signal.SIGINT, lambda *_: held.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        raise KeyboardInterrupt


with interrupts_exit():  # Ctrl-C while typer imports
    import typer

# offload.quant.PRESETS' names (that module imports torch, too slow for parsing a command line;
# tests/test_chat_cli.py checks that the two agree).
QUANT_PRESETS = ("a4e2", "a4e3", "a4e4", "nf4", "none")


def _quant(value: str | None) -> str | None:
    if value is not None and value not in QUANT_PRESETS:
        raise typer.BadParameter(f"{value!r} is not a preset; use one of {', '.join(QUANT_PRESETS)}")
    return value


def _cache_experts(value: str | None) -> int | str | None:
    if value in (None, "auto"):
        return value
    if not value.isdigit() or int(value) < 1:
        raise typer.BadParameter(f"must be 'auto' or an integer >= 1, got {value!r}")
    return int(value)


def _top_p(value: float) -> float:
    if not 0 < value <= 1:
        raise typer.BadParameter(f"must be in (0, 1], got {value}")
    return value


def _positive(value: float) -> float:
    if not value > 0:
        raise typer.BadParameter(f"must be > 0, got {value}")
    return value


# Options as annotated types: a command declares `model: Model = "demo"` and gets the same flag, help and checks.
Model = Annotated[str, typer.Option("--model", "-m", help="Model directory, hub repo id, or 'demo'.")]
Device = Annotated[str, typer.Option(help="cpu, cuda, or auto (cuda when available).")]
Quant = Annotated[str | None, typer.Option(callback=_quant, metavar="|".join(QUANT_PRESETS),
                                            help="Quantization preset applied at load.")]
CacheExperts = Annotated[str | None, typer.Option(
    "--cache-experts", callback=_cache_experts, help="Expert slots per MoE layer, or 'auto' (the planner); "
    "default: every expert resident.")]
Prefetch = Annotated[int, typer.Option(min=0, help="Later MoE layers whose experts are prefetched.")]
MaxNewTokens = Annotated[int, typer.Option("--max-new-tokens", "-n", min=0, help="Longest answer, in tokens.")]
Temperature = Annotated[float, typer.Option(min=0.0, help="0 = greedy.")]
TopP = Annotated[float, typer.Option(callback=_top_p, help="Nucleus sampling: in (0, 1], 1 = off.")]
TopK = Annotated[int, typer.Option(min=0, help="Sample from the k likeliest tokens (0 = off).")]
RepetitionPenalty = Annotated[float, typer.Option("--repeat-penalty", callback=_positive,
                                                  help="> 1 discourages repeating tokens (1 = off).")]
Seed = Annotated[int | None, typer.Option(help="Seed of the sampler (with temperature > 0).")]
Mtp = Annotated[bool, typer.Option("--mtp/--no-mtp", help="MTP speculative decoding (MiMo-V2-Flash).")]
Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]


def _flags_as_flags(command, ctx) -> None:
    """typer shows `<bool>` beside every flag (even --help), as if it took a value that it then rejects: show
    flags without one, in this command and its subcommands."""
    for param in [*command.params, command.get_help_option(ctx)]:
        if param is not None and getattr(param, "is_flag", False):
            param.metavar = ""
    for sub in getattr(command, "commands", {}).values():
        _flags_as_flags(sub, typer.Context(sub, parent=ctx))


def run_app(app, argv: list[str] | None = None) -> None:
    """Run a typer app; an uncaught error becomes `error: <message>` on stderr and exit 1,
    unless --debug is among the arguments, which shows the traceback; Ctrl-C anywhere exits 130."""
    args = sys.argv[1:] if argv is None else argv
    try:
        command = typer.main.get_command(app)  # tens of ms of introspection: Ctrl-C often lands here
        _flags_as_flags(command, typer.Context(command))
        code = command.main(args=args, standalone_mode=False)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        interrupted()
    except typer.exceptions.TyperException as e:  # usage errors: typer prints them itself
        e.show()
        sys.exit(e.exit_code)
    except Exception as e:  # noqa: BLE001 - the CLI boundary: report, don't crash
        if "--debug" in args:
            raise
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_RUNTIME)
    if code == EXIT_INTERRUPTED:  # typer turns Ctrl-C in a command into Exit(130), returned without standalone_mode
        interrupted()
    if isinstance(code, int):  # any other typer.Exit(code) raised in a command, returned the same way
        sys.exit(code)
