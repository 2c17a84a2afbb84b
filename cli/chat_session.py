"""One offload-chat conversation: its messages and sampling settings, answers streamed to the terminal, and the
figures of each answer (tokens, prefill and decode tok/s, the expert engine's counters)."""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, fields

from rich import filesize
from rich.console import Console

INTERRUPTED = " [interrupted]"  # shown after an answer that Ctrl-C stopped; the partial answer stays in the chat


@dataclass
class Settings:
    """What each answer is generated with; `/set NAME VALUE` changes one."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    mtp: bool = False

    def generate_options(self) -> dict:
        options = asdict(self)
        options["speculative"] = "mtp" if options.pop("mtp") else None
        return options

    def changed(self, name: str, text: str) -> Settings:
        """A copy with one setting parsed from text; ValueError (one line) for an unknown name or a bad value."""
        from offload.generate import Sampling

        key = name.replace("-", "_")
        kinds = {f.name: f.type for f in fields(self)}
        if key not in kinds:
            raise ValueError(f"no setting {name!r}; settings: {', '.join(kinds)}")
        value = _parse(text, kinds[key])
        new = Settings(**asdict(self) | {key: value})
        Sampling(new.temperature, new.top_p, new.top_k, new.repetition_penalty, new.seed)  # checks the values
        if new.max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")
        return new


def _parse(text: str, kind: str):
    """`kind` is the field's annotation as text (this module uses postponed annotations)."""
    if kind == "int | None" and text.lower() in ("none", "off"):
        return None
    if kind == "bool":
        if text.lower() not in ("on", "off", "true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"expected on or off, got {text!r}")
        return text.lower() in ("on", "true", "1", "yes")
    try:
        return float(text) if kind == "float" else int(text)
    except ValueError:
        raise ValueError(f"expected {'a number' if kind == 'float' else 'an integer'}, got {text!r}") from None


@dataclass
class EngineCounters:
    """The expert engine's counters summed over MoE layers (differences of two give one answer's)."""

    hits: int = 0
    misses: int = 0
    routed: int = 0
    predicted_correct: int = 0
    bytes_copied: int = 0

    @classmethod
    def of(cls, lm) -> EngineCounters | None:
        """None when every expert is resident (the engine counts nothing)."""
        per_layer = lm.stats().get("per_layer")
        if per_layer is None:
            return None
        return cls(**{f.name: sum(c[f.name] for c in per_layer.values()) for f in fields(cls)})

    def __sub__(self, other: EngineCounters) -> EngineCounters:
        return EngineCounters(**{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)})

    def describe(self) -> str:
        accesses = self.hits + self.misses
        rate = f"{self.hits / accesses:.0%}" if accesses else "-"
        recall = f"{self.predicted_correct / self.routed:.0%}" if self.routed else "-"
        return (f"{self.hits} hits, {self.misses} misses ({rate} hit), prefetch recall {recall}, "
                f"{filesize.decimal(self.bytes_copied)} copied")


@dataclass
class AnswerStats:
    prompt_tokens: int
    tokens: int
    prefill_s: float  # until the first piece of the answer
    decode_s: float  # from there to the end
    engine: EngineCounters | None

    def rates(self) -> str:
        prefill = f"prefill {self.prompt_tokens / self.prefill_s:.1f} tok/s" if self.prefill_s > 0 else "prefill -"
        decode = (f"decode {(self.tokens - 1) / self.decode_s:.1f} tok/s" if self.tokens > 1 and self.decode_s > 0
                  else "decode -")
        return f"{prefill} · {decode}"

    def status_line(self) -> str:
        line = f"{self.tokens} tokens · {self.rates()}"
        if self.engine is not None:
            accesses = self.engine.hits + self.engine.misses
            line += f" · experts {self.engine.hits / accesses:.0%} hit" if accesses else ""
        return line


class ChatSession:
    """The conversation with a loaded model (offload.MoEModel). `token_delay` (seconds slept after each piece)
    is for tests only: it makes an answer slow enough to interrupt."""

    def __init__(self, lm, settings: Settings, system: str | None, console: Console, token_delay: float = 0.0):
        self.lm, self.settings, self.console, self.token_delay = lm, settings, console, token_delay
        self.system = system
        self.messages: list[dict] = []  # user and assistant turns; an interrupted answer has "interrupted": True
        self.last: AnswerStats | None = None

    def conversation(self) -> list[dict]:
        """The messages as the model gets them: the system message first, no bookkeeping keys."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [{"role": m["role"], "content": m["content"]} for m in self.messages]

    def reset(self) -> None:
        self.messages = []

    def ask(self, text: str, label: str = "model> ") -> None:
        """Answer one user turn, streamed; Ctrl-C stops the answer and keeps what came so far (marked)."""
        self.messages.append({"role": "user", "content": text})
        self.console.print(f"[bold cyan]{label}[/bold cyan]", end="")
        pieces: list[str] = []
        try:
            self.last = self.stream(self.conversation(), pieces)
        except KeyboardInterrupt:
            self.console.print(INTERRUPTED, style="dim", markup=False)
            self.messages.append({"role": "assistant", "content": "".join(pieces), "interrupted": True})
            return
        self.messages.append({"role": "assistant", "content": "".join(pieces)})
        self.console.print(self.last.status_line(), style="dim", highlight=False)

    def stream(self, messages: list[dict], pieces: list[str]) -> AnswerStats:
        """Write the reply to stdout piece by piece (collected into `pieces`), then end the line; with the chat
        template when the tokenizer has one, else the last message as plain text."""
        lm = self.lm
        prompt = messages if lm.tokenizer.chat_template else messages[-1]["content"]
        before = EngineCounters.of(lm)
        start = first = time.perf_counter()
        stream = lm.generate(prompt, stream=True, **self.settings.generate_options())
        try:
            for piece in stream:
                if not pieces:
                    first = time.perf_counter()
                pieces.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
                if self.token_delay:
                    time.sleep(self.token_delay)
        finally:
            stream.close()
        end = time.perf_counter()
        sys.stdout.write("\n")
        sys.stdout.flush()
        after = EngineCounters.of(lm)
        answer = "".join(pieces)
        tokens = len(lm.tokenizer(answer, add_special_tokens=False)["input_ids"]) if answer else 0
        return AnswerStats(int(lm.prompt_ids(prompt).shape[1]), tokens, first - start, end - first,
                           None if after is None else after - before)
