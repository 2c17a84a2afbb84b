"""What the tests of files that lie (issue 15) share: the demo, the question it answers, one-line errors."""
from pathlib import Path

import offload

DEMO = Path(offload.__file__).parent / "demo"
QUESTION = [{"role": "user", "content": "What is 23+58?"}]


def ask(model, **kw) -> str:
    return model.generate(QUESTION, max_new_tokens=12, **kw)


def one_line(error: Exception, *names: str) -> str:
    """The error's message, which must be one line naming one of `names`."""
    message = str(error)
    assert "\n" not in message and any(n in message for n in names), message
    return message
