"""Ctrl-C ends the real console scripts with exit 130 and one line on stderr, whenever it comes: while Python
and the libraries import, while the model loads, while it answers, at the interactive prompt, while a checkpoint
converts (RELIABILITY.md, "Interrupts and threads")."""
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hf_tiny import save_tiny
from tiny_tokenizer import VOCAB_SIZE, save_tokenizer

import offload

BIN = Path(sys.executable).parent
DELAYS = (0.1, 0.3, 0.8, 2.0)  # seconds after the start: the imports, torch, the load, the answer


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    """Random weights: the answer runs to -n, so a late Ctrl-C still finds it generating."""
    path = tmp_path_factory.mktemp("random")
    save_tiny("mimo_v2_flash", path, vocab_size=VOCAB_SIZE)
    save_tokenizer(path)
    return path


def interrupt(args: list[str], when: float | str) -> tuple[int, str, str]:
    """Start a console script, send SIGINT `when` seconds after the start or once its stdout has output
    containing `when`, and return (exit status, stdout, stderr)."""
    process = subprocess.Popen([str(BIN / args[0]), *args[1:]], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    seen = b""
    if isinstance(when, float):
        time.sleep(when)
    else:
        deadline = time.monotonic() + 120
        while not (seen and when.encode() in seen) and time.monotonic() < deadline:
            if select.select([process.stdout], [], [], 1)[0]:
                seen += os.read(process.stdout.fileno(), 1 << 16)
        assert when.encode() in seen, seen
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    return process.returncode, (seen + out).decode(), err.decode()


def assert_interrupted(status: int, err: str, when) -> None:
    """130 and one line; a Ctrl-C in Python's own start, before any line of ours runs, may end it as Python
    does (killed by the signal, or a fatal error while `site` imports, on a machine slow enough)."""
    if (status, err) == (-signal.SIGINT, "") or err.startswith("Fatal Python error: init_import_site"):
        assert isinstance(when, float) and when < 0.5, (when, status, err)
        return
    assert (status, err) == (130, "interrupted\n"), (when, status, err)


@pytest.mark.parametrize("when", DELAYS)
def test_ctrl_c_during_a_one_shot_answer(random_model, when):
    status, _, err = interrupt(["offload-chat", "--model", str(random_model), "-p", "hi", "-n", "100000",
                                "--cache-experts", "2"], when)
    assert_interrupted(status, err, when)


def test_ctrl_c_while_generating_and_at_the_prompt(random_model):
    model = ["offload-chat", "--model", str(random_model), "-n", "100000"]
    status, out, err = interrupt([*model, "-p", "hi"], "")  # a piece of the answer is out
    assert_interrupted(status, err, "generating")
    status, out, err = interrupt(model, "offload-chat")  # the banner: the prompt waits for a line
    assert_interrupted(status, err, "at the prompt")


@pytest.mark.parametrize("when", DELAYS[:3])
def test_ctrl_c_during_convert(tmp_path, when):
    source = Path(offload.__file__).parent / "demo"
    status, _, err = interrupt(["offload-convert", str(source), str(tmp_path / "packed")], when)
    assert_interrupted(status, err, when)


def test_ctrl_c_while_typer_builds_the_command(monkeypatch, capsys):
    """Ctrl-C while typer introspects the app (tens of ms of start-up, where a Ctrl-C 0.1 s after the start
    lands on a slow machine): exit 130 and one line, as everywhere else."""
    from offload.cli import common
    from offload.cli.chat import app

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(common.typer.main, "get_command", interrupted)
    with pytest.raises(SystemExit) as exit_:
        common.run_app(app, ["-p", "hi"])
    assert exit_.value.code == 130 and capsys.readouterr().err == "interrupted\n"
