"""What every console script shares: exit codes and one-line errors instead of tracebacks, and Ctrl-C at any
moment as exit 130. Light to import (typer is imported when an app runs), so a script can guard its own imports
with `interrupts_exit`."""
from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

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


def run_app(app, argv: list[str] | None = None) -> None:
    """Run a typer app; an uncaught error becomes `error: <message>` on stderr and exit 1,
    unless --debug is among the arguments, which shows the traceback; Ctrl-C anywhere exits 130."""
    import typer

    args = sys.argv[1:] if argv is None else argv
    try:
        code = app(args=args, standalone_mode=False)
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
