"""offload-chat as a person uses it: the real console script on the bundled demo model, driven through a
pseudo-terminal (questions, streamed answers, /stats, Ctrl-C mid-answer and at the prompt, Ctrl-D, the input
history), and through pipes for the slash commands, multi-line input and the command-line flags. Answers are
checked against offload's own generate with the same messages and settings."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

import offload
from offload.cli.common import QUANT_PRESETS
from offload.quant.presets import PRESETS

BIN = Path(sys.executable).parent
TIMEOUT = 90  # seconds an expected output may take on a loaded 2-core machine


@pytest.fixture(scope="module")
def demo():
    return offload.load("demo")


def spawn(*args: str) -> pexpect.spawn:
    """offload-chat on a pseudo-terminal of 80 columns; TERM=dumb: line editing without colours or styles
    (plain text to expect)."""
    env = dict(os.environ, TERM="dumb", COLUMNS="80")
    return pexpect.spawn(str(BIN / "offload-chat"), list(args), env=env, encoding="utf-8", timeout=TIMEOUT,
                         dimensions=(24, 80))


def finish(chat: pexpect.spawn) -> str:
    chat.expect(pexpect.EOF)
    chat.close()
    return chat.before


def ask(chat: pexpect.spawn, text: str) -> str:
    """Send one turn; return the answer (the text between `model> ` and the status line)."""
    chat.sendline(text)
    chat.expect_exact("model> ")
    chat.expect(r"\r\n(\d+) tokens · prefill [\d.]+ tok/s · decode ([\d.]+|-)( tok/s)?[^\r\n]*\r\n")
    return chat.before.strip()


def run(*args: str, stdin: str = "", env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / args[0]), *args[1:]], input=stdin, capture_output=True, text=True,
                          timeout=300, env=None if env is None else dict(os.environ, **env))


def test_a_conversation_on_a_terminal(tmp_path, demo):
    """A question and its streamed answer, a second one in the same conversation, the previous input again
    from the history (up arrow), /stats, Ctrl-C in the middle of an answer (kept, marked), another question,
    /save, then Ctrl-D: exit 0."""
    chat = spawn("--cache-experts", "4", "--token-delay", "0.3")
    chat.expect_exact("you> ")
    first = [{"role": "user", "content": "What is 12+7?"}]
    assert ask(chat, "What is 12+7?") == demo.generate(first) == "12+7=19"
    ask(chat, "What is 81-29?")
    chat.expect_exact("you> ")
    assert ask(chat, "\x1b[A") != ""  # the up arrow brings back "What is 81-29?"
    chat.sendline("/stats")
    chat.expect(r"last answer: \d+ tokens after a \d+-token prompt; prefill [\d.]+ tok/s · decode [\d.]+ tok/s")
    chat.expect(r"experts, last answer: \d+ hits, \d+ misses \(\d+% hit\), prefetch recall \d+%, [\d.,]+ "
                r"(bytes|[kMG]B) copied")
    chat.expect(r"experts, since load: \d+ hits, \d+ misses")
    chat.sendline("What is 23+58?")
    chat.expect_exact("model> ")
    chat.expect(r"\S")  # the first piece of the answer is out: stop it there
    chat.sendintr()
    chat.expect_exact(" [interrupted]")
    ask(chat, "What is 12+7?")
    saved = tmp_path / "chat.json"
    chat.sendline(f"/save {saved}")
    chat.expect_exact("saved 10 messages")
    chat.sendeof()
    out = finish(chat)
    assert chat.exitstatus == 0 and "Traceback" not in out
    messages = json.loads(saved.read_text())["messages"]
    users = [m["content"] for m in messages if m["role"] == "user"]
    assert users == ["What is 12+7?", "What is 81-29?", "What is 81-29?", "What is 23+58?", "What is 12+7?"]
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    interrupted = messages[7]
    assert interrupted["interrupted"] is True and interrupted["role"] == "assistant"
    assert interrupted["content"] and demo.generate(plain[:7]).startswith(interrupted["content"])
    assert not any(m.get("interrupted") for i, m in enumerate(messages) if i != 7)
    assert messages[9]["content"] == demo.generate(plain[:9])  # the partial answer stayed in the conversation


def test_second_turn_is_answered_right():
    chat = spawn()
    chat.expect_exact("you> ")
    assert ask(chat, "What is 12+7?").endswith("19")
    assert ask(chat, "What is 81-29?").endswith("52")
    chat.sendeof()
    finish(chat)


def test_ctrl_c_at_the_prompt_exits_130_without_traceback():
    chat = spawn()
    chat.expect_exact("you> ")
    chat.sendintr()
    out = finish(chat)
    assert chat.exitstatus == 130 and "Traceback" not in out and "interrupted" in out


def test_slash_commands_and_multi_line_input(tmp_path, demo):
    """Unknown commands get a hint and never reach the model; /reset says so and empties the conversation;
    /system and /set change what the next answer is generated with (the same answer as generate's with those
    messages and settings); /save writes the conversation; a trailing \\ and \"\"\" blocks join lines."""
    saved = tmp_path / "chat.json"
    lines = ["What is 12+7?", "/reset", "/frobnicate now", "/system You add numbers.", "/set temperature 0.7",
             "/set seed 3", "/set top-k 5", "/set top_p 0", "/set nope 1", "What is \\", "23+58?",
             '"""What', "is 3+4?", '"""', f"/save {saved}", "/exit"]
    result = run("offload-chat", stdin="\n".join(lines) + "\n")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "unknown command /frobnicate: /help lists the commands" in out
    assert "conversation cleared" in out
    assert "/set: top_p must be in (0, 1]" in out and "/set: no setting 'nope'" in out
    record = json.loads(saved.read_text())
    assert record["settings"] | {"temperature": 0.7, "seed": 3, "top_k": 5} == record["settings"]
    messages = record["messages"]
    assert [m["content"] for m in messages if m["role"] != "assistant"] == [
        "You add numbers.", "What is \n23+58?", "What\nis 3+4?"]
    sampling = dict(temperature=0.7, seed=3, top_k=5)
    assert messages[2]["content"] == demo.generate(messages[:2], max_new_tokens=256, **sampling)
    assert messages[4]["content"] == demo.generate(messages[:4], max_new_tokens=256, **sampling)
    assert out.count("model> ") == 3


def test_help_lists_the_commands():
    result = run("offload-chat", stdin="/help\n")
    assert result.returncode == 0, result.stderr
    for command in ("/help", "/reset", "/system", "/set", "/stats", "/save", "/exit", "Ctrl-C", "Ctrl-D"):
        assert command in result.stdout


def test_prompt_from_stdin(demo):
    expected = demo.generate([{"role": "user", "content": "What is 23+58?"}])
    result = run("offload-chat", "-p", "-", stdin="What is 23+58?")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"


@pytest.mark.parametrize("args,stdin", [(["-p", ""], ""), (["-p", "-"], " \n"), (["--quant", "q4", "-p", "hi"], ""),
                                        (["--mtp", "true", "-p", "hi"], "")])
def test_usage_errors_exit_2(args, stdin):
    result = run("offload-chat", *args, stdin=stdin)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr


def test_bad_quant_names_the_valid_presets():
    error = run("offload-chat", "--quant", "q4", "-p", "hi").stderr
    lines = [line for line in error.splitlines() if "q4" in line]
    assert len(lines) == 1 and all(name in lines[0] for name in PRESETS), error
    assert set(QUANT_PRESETS) == set(PRESETS)  # the CLI's list is offload.quant's


def test_mtp_is_a_flag(demo):
    expected = demo.generate([{"role": "user", "content": "What is 12+7?"}])
    for flag in ("--mtp", "--no-mtp"):
        result = run("offload-chat", flag, "-p", "What is 12+7?")
        assert (result.returncode, result.stdout) == (0, expected + "\n"), result.stderr
    usage = run("offload-chat", "--help", env={"COLUMNS": "80"}).stdout
    assert "--mtp" in usage and "--no-mtp" in usage and "<bool>" not in usage and "…" not in usage
