"""What every console script shares: exit codes and one-line errors instead of tracebacks."""
from __future__ import annotations

import sys

import typer

EXIT_RUNTIME = 1  # typer/click already exit 2 on usage errors


def run_app(app: typer.Typer, argv: list[str] | None = None) -> None:
    """Run a typer app; an uncaught error becomes `error: <message>` on stderr and exit 1,
    unless --debug is among the arguments, which shows the traceback."""
    args = sys.argv[1:] if argv is None else argv
    try:
        app(args=args, standalone_mode=False)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        sys.exit(130)
    except typer.exceptions.TyperException as e:  # usage errors: typer prints them itself
        e.show()
        sys.exit(e.exit_code)
    except Exception as e:  # noqa: BLE001 - the CLI boundary: report, don't crash
        if "--debug" in args:
            raise
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_RUNTIME)

