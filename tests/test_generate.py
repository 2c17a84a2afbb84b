"""generate(): text/chat/stream/stop/EOS through a real byte-level BPE tokenizer, sampling rules against
transformers' logits processors, left-padded batches against single prompts and transformers."""
from __future__ import annotations

import pytest
import torch
from hf_tiny import save_tiny
from tiny_tokenizer import VOCAB_SIZE, save_tokenizer
from transformers import RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import offload
from offload.generate import Sampling, TextStream, next_tokens

MULTIBYTE = "héllo wörld 日本語 🙂"


N = 16  # new tokens in the text tests


class TextModel:
    """A tiny checkpoint with a trained tokenizer and chat template beside it; greedy runs are memoized."""

    def __init__(self, arch: str, directory) -> None:
        save_tiny(arch, directory, vocab_size=VOCAB_SIZE)
        self.tok = save_tokenizer(directory)
        self.model = offload.load(directory)
        self._greedy: dict[tuple[int, ...], list[int]] = {}

    def greedy(self, ids: list[int]) -> list[int]:
        """The N new token ids the tensor API produces greedily after `ids`."""
        if tuple(ids) not in self._greedy:
            self._greedy[tuple(ids)] = self.model.generate(torch.tensor([ids]), N)[0, len(ids):].tolist()
        return self._greedy[tuple(ids)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


@pytest.fixture(scope="module", params=["mimo_v2_flash", "qwen3_moe"])
def tm(request, tmp_path_factory) -> TextModel:
    return TextModel(request.param, tmp_path_factory.mktemp(f"tok_{request.param}"))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return save_tokenizer(tmp_path_factory.mktemp("tok_only"))


# --- text, chat, streaming, stop strings, EOS ---------------------------------------------------------------

def test_text_prompt_equals_tensor_api(tm):
    text = tm.model.generate(MULTIBYTE, N)
    assert isinstance(text, str)
    assert text == tm.decode(tm.greedy(tm.tok(MULTIBYTE)["input_ids"]))


def test_chat_uses_chat_template(tm, monkeypatch):
    messages = [{"role": "user", "content": "hello wörld"}]
    expected = tm.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert expected[-1] == tm.tok.convert_tokens_to_ids("<|assistant|>")
    fed = []
    loop = offload.lm.token_loop

    def spy(decoder, input_ids, *args):
        fed.append(input_ids[0].tolist())
        return loop(decoder, input_ids, *args)

    monkeypatch.setattr(offload.lm, "token_loop", spy)
    text = tm.model.generate(messages, N)
    assert fed == [list(expected)]
    assert text == tm.decode(tm.greedy(list(expected)))


def test_stream_concatenation_equals_text(tm):
    pieces = list(tm.model.generate(MULTIBYTE, N, stream=True))
    full = tm.decode(tm.greedy(tm.tok(MULTIBYTE)["input_ids"]))
    assert all(pieces) and "".join(pieces) == full == tm.model.generate(MULTIBYTE, N)
    # a character emitted before it was complete would be a U+FFFD that the full text does not have
    assert sum(p.count("\ufffd") for p in pieces) == full.count("\ufffd")


def test_stream_never_splits_a_character(tok):
    """Feed the tokens of text whose BPE tokens cut UTF-8 sequences: every piece is whole characters."""
    ids = tok(MULTIBYTE)["input_ids"]
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # the tokenizer does split characters
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == MULTIBYTE
    assert "" in pieces[:-1]  # something was held back while a character was incomplete


def test_stop_string(tm):
    prompt = "the quick brown"
    full = tm.decode(tm.greedy(tm.tok(prompt)["input_ids"]))
    stop = next(full[i:i + 2] for i in range(2, len(full) - 1) if "\ufffd" not in full[i:i + 2])
    expected = full[: full.find(stop)]
    text = tm.model.generate(prompt, N, stop=stop)
    assert text == expected and stop not in text
    assert "".join(tm.model.generate(prompt, N, stop=["never", stop], stream=True)) == text


def test_stop_string_completed_by_a_token_ending_mid_character(tok):
    """A token that ends a stop string and begins a multi-byte character: the stop holds even when
    generation ends right after it (EOS or max_new_tokens)."""
    token = next(i for i in range(VOCAB_SIZE) if (s := tok.decode([i])).endswith("\ufffd") and s[0] != "\ufffd")
    stream = TextStream(tok, [tok.decode([token])[0]])
    assert stream.push(token) == ""
    assert stream.stopped and stream.flush() == ""


def test_stop_string_held_back_until_decided(tok):
    stream = TextStream(tok, ["lo w"])
    pieces = [stream.push(i) for i in tok("hello world")["input_ids"]]
    assert "".join(pieces) == "hel" and stream.stopped and stream.flush() == ""
    stream = TextStream(tok, ["lo x"])
    pieces = [stream.push(i) for i in tok("hello world")["input_ids"]] + [stream.flush()]
    assert "".join(pieces) == "hello world"


def test_eos_stops_generation(tm):
    ids = tm.tok("the quick brown")["input_ids"]
    greedy = tm.greedy(ids)
    eos = greedy[6]
    first = greedy.index(eos)
    out = tm.model.generate(torch.tensor([ids]), N, eos_token_ids=[eos])[0, len(ids):].tolist()
    assert out == greedy[: first + 1]
    assert tm.model.generate("the quick brown", N, eos_token_ids=[eos]) == tm.decode(greedy[:first])


# --- sampling -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tm", ["qwen3_moe"], indirect=True)  # sampling does not depend on the architecture
def test_seed_reproducible_and_seeds_differ(tm):
    prompt = "the quick brown"
    ids = torch.tensor([tm.tok(prompt)["input_ids"]])
    run0 = tm.model.generate(ids, 32, temperature=1.0, seed=0)[0, ids.shape[1]:].tolist()
    assert tm.model.generate(ids, 32, temperature=1.0, seed=0)[0, ids.shape[1]:].tolist() == run0
    assert tm.model.generate(prompt, 32, temperature=1.0, seed=1) != tm.decode(run0)


@pytest.mark.parametrize("tm", ["qwen3_moe"], indirect=True)
@pytest.mark.parametrize("kw", [dict(top_k=1, temperature=0.7, seed=3), dict(top_p=1e-6, temperature=1.5, seed=4)])
def test_degenerate_sampling_is_greedy(tm, kw):
    ids = tm.tok(MULTIBYTE)["input_ids"]
    assert tm.model.generate(torch.tensor([ids]), N, **kw)[0, len(ids):].tolist() == tm.greedy(ids)


def _hf_filtered(logits, history, temperature, top_k, top_p, penalty):
    scores = RepetitionPenaltyLogitsProcessor(penalty)(history, logits.clone()) if penalty != 1.0 else logits
    if temperature == 0:
        return scores
    scores = TemperatureLogitsWarper(temperature)(history, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(history, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(history, scores)
    return scores


@pytest.mark.parametrize("temperature,top_k,top_p,penalty", [
    (0.0, 0, 1.0, 1.3), (0.0, 0, 1.0, 0.7), (1.0, 0, 1.0, 1.0), (0.7, 5, 1.0, 1.0), (1.3, 0, 0.6, 1.0),
    (0.8, 12, 0.75, 1.5), (1.0, 3, 0.9, 0.8)])
def test_next_tokens_match_transformers_processors(temperature, top_k, top_p, penalty):
    g = torch.Generator().manual_seed(7)
    rows, vocab = 6, 40
    logits = torch.randn(rows, vocab, generator=g) * 3
    history = torch.randint(0, vocab, (rows, 10), generator=g)
    s = Sampling(temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=penalty)
    scores = _hf_filtered(logits, history, temperature, top_k, top_p, penalty)
    if temperature == 0:
        assert next_tokens(logits, history, s, None).tolist() == scores.argmax(-1).tolist()
        return
    allowed = scores > float("-inf")
    draws = 400
    many = next_tokens(logits.repeat(draws, 1), history.repeat(draws, 1), s, torch.Generator().manual_seed(0))
    seen = torch.zeros_like(allowed)
    seen[torch.arange(rows).repeat(draws), many] = True
    probs = scores.softmax(-1)
    assert not (seen & ~allowed).any(), "sampled a token transformers filters out"
    assert (seen | (probs < 0.02)).all(), "never sampled a token transformers keeps with probability >= 2%"
    # the same generator state draws the same tokens from transformers' distribution
    ours = next_tokens(logits, history, s, torch.Generator().manual_seed(11))
    theirs = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(11)).squeeze(1)
    assert ours.tolist() == theirs.tolist()


@pytest.mark.parametrize("kw", [dict(temperature=-0.1), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1),
                                dict(repetition_penalty=0.0)])
def test_invalid_sampling_raises(tiny_model, kw):
    with pytest.raises(ValueError):
        tiny_model.generate(torch.tensor([[1, 2, 3]]), 4, **kw)
    with pytest.raises(ValueError):
        Sampling(**kw)


# --- batches and tensor edges -------------------------------------------------------------------------------

def _left_padded(lengths: list[int], seed: int = 5) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, 256, (n,), generator=g).tolist() for n in lengths]
    T = max(lengths)
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask, prompts


def test_left_padded_batch_equals_single_prompts_and_transformers(tiny):
    arch, path, ref = tiny
    model = offload.load(path)
    ids, mask, prompts = _left_padded([5, 11, 8])
    out = model.generate(ids, 16, attention_mask=mask)
    assert out.shape == (3, ids.shape[1] + 16)
    assert torch.equal(out[:, : ids.shape[1]], ids)
    for row, prompt in enumerate(prompts):
        assert out[row, ids.shape[1]:].tolist() == model.generate(torch.tensor([prompt]), 16)[0, len(prompt):].tolist(), f"{arch} row {row}"
    expected = ref.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=16, min_new_tokens=16,
                            pad_token_id=0)
    assert out.tolist() == expected.tolist(), arch


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("olmoe_plain")
    save_tiny("olmoe", directory)
    return offload.load(directory)


def test_zero_new_tokens_and_1d_input(tiny_model):
    ids = torch.randint(1, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    assert torch.equal(tiny_model.generate(ids, 0), ids)
    single = tiny_model.generate(ids[1], 5)
    assert single.shape == (1, 12)
    assert single.tolist() == tiny_model.generate(ids[1:], 5).tolist()
    assert torch.equal(tiny_model.generate(ids[1], 0), ids[1:])
