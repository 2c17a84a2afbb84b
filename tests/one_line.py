"""The shape every refusal must have: exactly the expected error type, one line, naming what it is about."""
import pytest


def raises_one_line(call, exc_type: type, *parts: str) -> str:
    """call() raises exactly `exc_type` with a non-empty one-line message containing every part; the message."""
    with pytest.raises(Exception) as info:
        call()
    assert type(info.value) is exc_type, f"{type(info.value).__name__}: {info.value}"
    message = str(info.value)
    assert message and "\n" not in message, f"message must be one line: {message!r}"
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"
    return message
