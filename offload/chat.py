"""Chat templates rendered with bounded work and output.

A chat template is code that comes with the model. transformers renders it in jinja2's sandbox, which stops
attribute tricks but not work: nested `range(100000)` loops, `'A' * 10**8` or `10 ** 10 ** 8` run for minutes or
fill memory. We render with the same environment transformers builds (its filters, globals and extensions, so the
text is identical) in a sandbox subclass that counts steps (calls, attribute and item lookups, range items,
filter calls), refuses repetitions, powers, format widths and call arguments whose result would be huge, and
stops when the output outgrows its limit. Any failure is one ModelFormatError naming the template and the fix.
"""
from __future__ import annotations

import contextvars
import functools
import operator
import re
from collections.abc import Callable, Iterator
from typing import Any

from jinja2.sandbox import MAX_RANGE, ImmutableSandboxedEnvironment

from .errors import ModelFormatError

MAX_STEPS = 300_000  # a 2000-message chat takes ~60k with the templates we know
MAX_CHARS = 1 << 20  # rendered text, plus 8x the messages' own length
_budget: contextvars.ContextVar[_Budget] = contextvars.ContextVar("chat_template_budget")


class TemplateLimit(Exception):
    """Raised inside a render that exceeded its limits."""


class _Budget:
    def __init__(self, max_chars: int) -> None:
        self.steps, self.max_chars = 0, max_chars

    def step(self) -> None:
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise TemplateLimit(f"it ran more than {MAX_STEPS} steps")

    def size(self, n: int) -> None:
        if n > self.max_chars:
            raise TemplateLimit(f"it would build a value of {n} items (limit {self.max_chars})")


def _current() -> _Budget:
    return _budget.get()


def _check_args(args: tuple, kwargs: dict) -> None:
    """An integer argument this large only ever asks for a huge result (a width, a count)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool):
            _current().size(abs(value))


def _check_format(text: Any) -> None:
    """A format string ('%*d', '{:>N}') whose widths ask for a huge result."""
    if isinstance(text, str):
        for digits in re.findall(r"\d{7,}", text):
            _current().size(int(digits))


def _sized(value: Any) -> Any:
    if isinstance(value, (str, list, tuple, dict)):
        _current().size(len(value))
    return value


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "%"})

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's own signature
        _current().step()
        _check_args(args, kwargs)
        return _sized(super().call(__context, __obj, *args, **kwargs))

    def wrap_str_format(self, value):
        """jinja wraps `str.format` at attribute access, and the wrapper no longer knows its string: check it here."""
        if getattr(value, "__name__", None) in ("format", "format_map"):
            _check_format(getattr(value, "__self__", None))
        return super().wrap_str_format(value)

    def getattr(self, obj, attribute):
        _current().step()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        _current().step()
        return super().getitem(obj, argument)

    def call_binop(self, context, op: str, left, right):
        _current().step()
        if op == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(count, int):
                    _current().size(len(seq) * count)
            return operator.mul(left, right)
        if op == "%":
            _check_format(left)
            _check_args(right if isinstance(right, tuple) else (right,), {})
            return _sized(operator.mod(left, right))
        if isinstance(left, int) and isinstance(right, (int, float)) and abs(left) > 1:  # '**'
            _current().size(int(abs(right) * max(abs(left), 2).bit_length()) // 8)
        return operator.pow(left, right)


def _bounded_range(*args: int) -> Iterator[int]:
    items = range(*args)
    if len(items) > MAX_RANGE:
        raise TemplateLimit(f"range() of {len(items)} items (limit {MAX_RANGE})")
    for i in items:
        _current().step()
        yield i


def _bounded_filter(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def filtered(*args, **kwargs):
        _current().step()
        _check_args(args[1:], kwargs)
        return _sized(fn(*args, **kwargs))
    return filtered


@functools.lru_cache(maxsize=16)
def _compiled(source: str):
    """The template in our environment, copying what transformers' environment adds to jinja's."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    reference = _compile_jinja_template("").environment  # never compile `source` there: jinja folds constants
    env = BoundedEnvironment(trim_blocks=True, lstrip_blocks=True,
                             extensions=[type(e) for e in reference.extensions.values()])
    env.filters.update({name: _bounded_filter(f) for name, f in reference.filters.items()})
    env.tests.update(reference.tests)
    env.globals.update(reference.globals)
    env.globals["range"] = _bounded_range
    return env.from_string(source)


def render_chat(tokenizer, messages: list[dict[str, str]], where: str) -> str:
    """The text transformers' apply_chat_template(add_generation_prompt=True, tokenize=False) would give, with
    bounded work and output. `where` (the model's directory) names the template in errors."""
    try:
        source = tokenizer.get_chat_template()
    except ValueError:
        raise ModelFormatError(f"{where} has no chat template (chat_template.jinja or tokenizer_config.json's "
                               "chat_template); pass text or token ids instead of chat messages") from None
    length = sum(len(str(v)) for m in messages for v in m.values())
    token = _budget.set(_Budget(MAX_CHARS + 8 * length))
    try:
        pieces, total = [], 0
        for piece in _compiled(source).generate(messages=[dict(m) for m in messages], tools=None, documents=None,
                                                add_generation_prompt=True, **tokenizer.special_tokens_map):
            total += len(piece)
            _current().size(total)
            pieces.append(piece)
        return "".join(pieces)
    except Exception as e:  # noqa: BLE001 - a template can fail in any way; each is the template's fault
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ModelFormatError(f"the chat template of {where} cannot render these messages ({reason}); fix the "
                               "template (chat_template.jinja or tokenizer_config.json), or pass text or token "
                               "ids instead of chat messages") from None
    finally:
        _budget.reset(token)
