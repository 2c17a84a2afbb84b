'''Reading the user's turns at the chat prompt: line editing and history of earlier inputs (readline), a
trailing backslash to continue on the next line, and """ ... """ blocks for pasting several lines.'''
from __future__ import annotations

import re

from rich.console import Console

QUOTES = '"""'


def enable_line_editing() -> None:
    """input() edits lines and keeps a history (arrow keys, Ctrl-R) once readline is imported."""
    try:
        import readline  # noqa: F401
    except ImportError:  # a Python built without it: plain input
        pass


def styled(console: Console, text: str, style: str) -> str:
    """The prompt text in colour for input(), its escape codes marked (\\001 \\002) so that readline does not
    count them as columns; plain text off a terminal or with NO_COLOR."""
    if not console.is_terminal or console.no_color:
        return text
    with console.capture() as captured:
        console.print(text, style=style, end="")
    return re.sub(r"(\x1b\[[0-9;]*m)", "\001\\1\002", captured.get())


def read_turn(prompt: str, more: str) -> str:
    """One turn of the user: a line, lines joined by trailing backslashes, or a \"\"\"-quoted block.
    Raises EOFError on Ctrl-D and KeyboardInterrupt on Ctrl-C, as input() does."""
    line = input(prompt)
    if line.lstrip().startswith(QUOTES):
        return _block(line.lstrip()[len(QUOTES):], more)
    lines = []
    while line.endswith("\\"):
        lines.append(line[:-1])
        line = input(more)
    return "\n".join([*lines, line])


def _block(first: str, more: str) -> str:
    """The lines up to the one that ends with the closing quotes (which may be the first)."""
    lines, line = [], first
    while not line.rstrip().endswith(QUOTES):
        lines.append(line)
        line = input(more)
    lines.append(line.rstrip()[: -len(QUOTES)])
    return "\n".join(lines).strip("\n")
