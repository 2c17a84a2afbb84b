"""generate(..., stream=True)'s Reply on the demo model: the token count and finish reason an OpenAI-style
server reports, against the tensor API's tokens; close() ends it early."""
import pytest
import torch

import offload

QUESTION = [{"role": "user", "content": "What is 12+35?"}]


@pytest.fixture(scope="module")
def demo():
    return offload.load("demo", device="cpu")


@pytest.fixture(scope="module")
def greedy(demo) -> tuple[int, list[int]]:
    """(prompt length, the new token ids the tensor API gives greedily, EOS included)."""
    ids = demo.prompt_ids(QUESTION)
    return ids.shape[1], demo.generate(ids, max_new_tokens=64)[0, ids.shape[1]:].tolist()


def test_reply_ended_by_eos(demo, greedy):
    prompt_tokens, tokens = greedy
    assert tokens[-1] in demo.eos_token_ids and len(tokens) < 64
    reply = demo.generate(QUESTION, max_new_tokens=64, stream=True)
    assert "".join(reply) == demo.tokenizer.decode(tokens, skip_special_tokens=True)
    assert (reply.prompt_tokens, reply.completion_tokens, reply.finish_reason) == (prompt_tokens, len(tokens), "stop")


def test_reply_ended_by_length(demo, greedy):
    _, tokens = greedy
    reply = demo.generate(QUESTION, max_new_tokens=3, stream=True)
    assert "".join(reply) == demo.tokenizer.decode(tokens[:3], skip_special_tokens=True)
    assert (reply.completion_tokens, reply.finish_reason) == (3, "length")
    empty = demo.generate(QUESTION, max_new_tokens=0, stream=True)
    assert (list(empty), empty.completion_tokens, empty.finish_reason) == ([], 0, "length")


def test_reply_ended_by_stop_string(demo, greedy):
    _, tokens = greedy
    text = demo.tokenizer.decode(tokens, skip_special_tokens=True)
    stop = text[text.index("+"):text.index("+") + 2]  # "+" and the next character
    reply = demo.generate(QUESTION, max_new_tokens=64, stop=[stop], stream=True)
    assert "".join(reply) == text[:text.index(stop)]
    # the first token whose text completes the stop string is the last one generated
    needed = next(n for n in range(1, len(tokens) + 1)
                  if stop in demo.tokenizer.decode(tokens[:n], skip_special_tokens=True))
    assert (reply.completion_tokens, reply.finish_reason) == (needed, "stop")


def test_closed_reply(demo, greedy):
    _, tokens = greedy
    reply = demo.generate(QUESTION, max_new_tokens=64, stream=True)
    next(reply)
    reply.close()
    assert list(reply) == [] and reply.finish_reason is None and 0 < reply.completion_tokens < len(tokens)
    assert torch.equal(demo.generate(demo.prompt_ids(QUESTION), max_new_tokens=64)[0, -len(tokens):],
                       torch.tensor(tokens))
