"""The slash commands of offload-chat (/help, /reset, /system, /set, /stats, /save, /exit): a line that starts
with / is one of them and never goes to the model (`//text` sends `/text`)."""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from .chat_session import ChatSession, EngineCounters

KEYS = ('Ctrl-C stops an answer (what came so far stays in the conversation) or, at the prompt, quits; '
        'Ctrl-D quits; a line ending in \\ continues on the next; """ starts and ends a block of several lines; '
        '//text sends /text.')


def is_command(text: str) -> bool:
    return text.startswith("/") and not text.startswith("//")


def run_command(session: ChatSession, text: str) -> bool:
    """Carry out one slash command; False when the chat should end."""
    name, _, argument = text[1:].strip().partition(" ")
    if name in ("exit", "quit"):
        return False
    command = COMMANDS.get(name)
    if command is None:
        session.console.print(f"unknown command /{name}: /help lists the commands (//{name} sends it as text)",
                              style="yellow", markup=False, highlight=False)
        return True
    command[0](session, argument.strip())
    return True


def _help(session: ChatSession, _: str) -> None:
    for name, (_, usage, what) in COMMANDS.items():
        session.console.print(f"  /{name}{' ' + usage if usage else ''}".ljust(24) + what, markup=False,
                              highlight=False)
    session.console.print("  /exit".ljust(24) + "quit (also /quit)", markup=False, highlight=False)
    session.console.print(KEYS, markup=False, highlight=False)


def _reset(session: ChatSession, _: str) -> None:
    session.reset()
    kept = " (the system message stays; /system changes it)" if session.system else ""
    session.console.print(f"conversation cleared{kept}", markup=False, highlight=False)


def _system(session: ChatSession, text: str) -> None:
    if not text:
        session.console.print(f"system message: {session.system or '(none)'}", markup=False, highlight=False)
        return
    session.system = text
    session.console.print("system message set; it leads the conversation from now on", markup=False,
                          highlight=False)


def _set(session: ChatSession, argument: str) -> None:
    name, _, value = argument.partition(" ")
    if not name:
        settings = ", ".join(f"{k} {v}" for k, v in asdict(session.settings).items())
        session.console.print(f"settings: {settings}", markup=False, highlight=False)
        return
    try:
        session.settings = session.settings.changed(name, value.strip())
    except ValueError as e:
        session.console.print(f"/set: {e}", style="yellow", markup=False, highlight=False)
        return
    session.console.print(f"{name} = {getattr(session.settings, name.replace('-', '_'))}", markup=False,
                          highlight=False)


def _stats(session: ChatSession, _: str) -> None:
    out = session.console
    last = session.last
    if last is None:
        out.print("last answer: none yet", markup=False)
    else:
        out.print(f"last answer: {last.tokens} tokens after a {last.prompt_tokens}-token prompt; {last.rates()}",
                  markup=False, highlight=False)
        if last.engine is not None:
            out.print(f"experts, last answer: {last.engine.describe()}", markup=False, highlight=False)
    total = EngineCounters.of(session.lm)
    if total is None:
        out.print("experts: all resident (no offloading: --cache-experts offloads them)", markup=False,
                  highlight=False)
    else:
        out.print(f"experts, since load: {total.describe()}", markup=False, highlight=False)
    speculative = session.lm.stats()["speculative"]
    if speculative["verify_steps"]:
        out.print(f"MTP, since load: acceptance {speculative['acceptance']:.2f}, "
                  f"{speculative['tokens_per_forward']:.2f} tokens/forward", markup=False, highlight=False)


def _save(session: ChatSession, path: str) -> None:
    """The conversation as JSON, written beside the target and renamed onto it (never half a file)."""
    if not path:
        session.console.print("/save needs a file name: /save chat.json", style="yellow", markup=False)
        return
    target = Path(path).expanduser()
    record = {"model": str(session.lm.path), "settings": asdict(session.settings),
              "messages": ([{"role": "system", "content": session.system}] if session.system else [])
              + session.messages}
    try:
        _write_atomically(target, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    except OSError as e:
        session.console.print(f"/save: cannot write {target}: {e.strerror or e}", style="yellow", markup=False)
        return
    session.console.print(f"saved {len(record['messages'])} messages to {target}", markup=False, highlight=False)


def _write_atomically(target: Path, text: str) -> None:
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


COMMANDS: dict[str, tuple[Callable[[ChatSession, str], None], str, str]] = {
    "help": (_help, "", "this list"),
    "reset": (_reset, "", "start a new conversation"),
    "system": (_system, "[TEXT]", "set (or show) the system message"),
    "set": (_set, "[NAME VALUE]", "change a setting, e.g. /set temperature 0.7 (alone: show them)"),
    "stats": (_stats, "", "tokens, tok/s and expert cache figures"),
    "save": (_save, "FILE", "write the conversation to FILE as JSON"),
}
