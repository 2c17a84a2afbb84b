"""Inputs that are valid but extreme, and arguments that are not valid: memory proportional to what is generated
whatever max_new_tokens says, a stated policy at the model's context limit, empty prompts and attention masks that
would give a wrong row, and every offload.load option checked before any heavy work."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from hf_tiny import save_tiny
from one_line import raises_one_line

import offload
from offload.model import kv_cache


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A 2-layer Mixtral (full attention, no window) with a 64-token context."""
    directory = tmp_path_factory.mktemp("extreme")
    save_tiny("mixtral", directory, num_hidden_layers=2, sliding_window=None, max_position_embeddings=64)
    return directory


@pytest.fixture(scope="module")
def model(tiny_dir):
    return offload.load(tiny_dir)


def _one_line_value_error(call, *parts: str) -> str:
    return raises_one_line(call, ValueError, *parts)


# --- C: memory proportional to what is generated; the context limit ---------------------------------------------

CHILD = textwrap.dedent("""
    import json, resource, sys, torch
    import offload
    torch.set_num_threads(1)
    model = offload.load(sys.argv[1])
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    greedy = model.generate(ids, max_new_tokens=8)[0, 8:].tolist()
    stop = max(i for i, t in enumerate(greedy) if t not in greedy[:i])  # the last token not seen before: EOS
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = model.generate(ids, max_new_tokens=int(sys.argv[2]), eos_token_ids=[greedy[stop]])
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(json.dumps({"new_tokens": out.shape[1] - 8, "expected": stop + 1, "peak_growth_mb": grown / 1024}))
""")


@pytest.mark.parametrize("max_new_tokens", [4_000_000, 10**9])
def test_huge_max_new_tokens_costs_only_what_is_generated(tmp_path_factory, max_new_tokens):
    """Peak RSS of an 8-token reply is the same whatever max_new_tokens allows (was +2 GB for 4M, and a failed
    128 GB allocation for 10**9, the KV cache being allocated for all of it up front)."""
    directory = tmp_path_factory.mktemp("long_context")
    save_tiny("mixtral", directory, num_hidden_layers=4, sliding_window=None, max_position_embeddings=2**40)
    result = subprocess.run([sys.executable, "-c", CHILD, str(directory), str(max_new_tokens)], capture_output=True,
                            text=True, timeout=300, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["new_tokens"] == report["expected"] >= 4
    assert report["peak_growth_mb"] < 20, report


def test_kv_cache_growth_is_exact(model, monkeypatch):
    """The cache grows in chunks; a chunk of 3 (many reallocations) gives the same tokens as one allocation."""
    ids = torch.randint(1, 256, (2, 5), generator=torch.Generator().manual_seed(1))
    expected = model.generate(ids, max_new_tokens=40)
    monkeypatch.setattr(kv_cache, "CHUNK", 3)
    assert torch.equal(model.generate(ids, max_new_tokens=40), expected)


def test_kv_cache_holds_only_what_was_written(model):
    cache = model.decoder.new_cache(1, 10**9)
    assert cache.nbytes() <= 2 * 2 * kv_cache.CHUNK * 2 * 16 * 4  # layers x k,v x chunk x kv heads x dim x fp32


@pytest.mark.parametrize("entry", ["forward", "generate"])
def test_prompt_longer_than_the_context_is_refused(model, entry):
    ids = torch.ones(1, 65, dtype=torch.long)
    call = (lambda: model.forward(ids)) if entry == "forward" else (lambda: model.generate(ids, max_new_tokens=1))
    _one_line_value_error(call, "65", "64", "max_position_embeddings")


def test_generation_stops_at_the_context_limit_with_a_warning(model):
    ids = torch.randint(1, 256, (1, 50), generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        within = model.generate(ids, max_new_tokens=14)  # exactly up to the limit: no warning
    with pytest.warns(UserWarning, match="context limit of 64 tokens"):
        capped = model.generate(ids, max_new_tokens=1000)
    assert capped.shape == (1, 64) and torch.equal(capped, within)


def test_text_stream_stops_at_the_context_limit(tmp_path, monkeypatch):
    from tiny_tokenizer import VOCAB_SIZE, save_tokenizer

    save_tiny("mixtral", tmp_path, num_hidden_layers=2, vocab_size=VOCAB_SIZE, max_position_embeddings=24)
    save_tokenizer(tmp_path)
    model = offload.load(tmp_path)
    seen = []
    loop = offload.lm.token_loop

    def spy(decoder, input_ids, *args):
        for token in loop(decoder, input_ids, *args):
            seen.append(input_ids.shape[1])
            yield token

    monkeypatch.setattr(offload.lm, "token_loop", spy)
    with pytest.warns(UserWarning, match="context limit of 24 tokens"):
        model.generate("the quick brown fox", max_new_tokens=10**6)
    assert seen[0] + len(seen) == 24


# --- D: empty prompts and attention masks -------------------------------------------------------------------

@pytest.mark.parametrize("entry", ["forward", "generate", "generate_1d"])
def test_empty_prompt(model, entry):
    ids = torch.zeros(1, 0, dtype=torch.long)
    call = {"forward": lambda: model.forward(ids), "generate": lambda: model.generate(ids, max_new_tokens=2),
            "generate_1d": lambda: model.generate(ids[0], max_new_tokens=2)}[entry]
    _one_line_value_error(call, "empty")


IDS = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
BAD_MASKS = {
    "shape": (torch.ones(2, 3, dtype=torch.long), "shape"),
    "batch": (torch.ones(1, 4, dtype=torch.long), "shape"),
    "values": (torch.tensor([[1, 1, 1, 2], [1, 1, 1, 1]]), "0 and 1"),
    "all_zero_row": (torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]]), "row 1"),
    "right_padded": (torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]), "left"),
    "hole": (torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]]), "left"),
}


@pytest.mark.parametrize("name", sorted(BAD_MASKS))
def test_bad_attention_mask_in_generate(model, name):
    mask, part = BAD_MASKS[name]
    _one_line_value_error(lambda: model.generate(IDS, max_new_tokens=2, attention_mask=mask), "attention_mask", part)


@pytest.mark.parametrize("name", ["shape", "batch", "values", "all_zero_row"])
def test_bad_attention_mask_in_forward(model, name):
    mask, part = BAD_MASKS[name]
    _one_line_value_error(lambda: model.forward(IDS, attention_mask=mask), "attention_mask", part)


def test_left_padded_batch_still_matches_single_rows(model):
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    out = model.generate(IDS, max_new_tokens=5, attention_mask=mask)
    assert out[0, 4:].tolist() == model.generate(IDS[:1, 2:], max_new_tokens=5)[0, 2:].tolist()
    assert out[1].tolist() == model.generate(IDS[1:], max_new_tokens=5)[0].tolist()


# --- E: offload.load options ---------------------------------------------------------------------------------

BAD_OPTIONS = [
    ("placement", "bogus"), ("prefetch", -1), ("prefetch", 1.5), ("prefetch", True), ("context", -5),
    ("context", 0), ("memory_budget", -1), ("memory_budget", 0), ("cache_experts", 0), ("cache_experts", -2),
    ("cache_experts", 2.5), ("cache_experts", "all"), ("policy", "bogus"), ("miss_policy", "bogus"),
    ("quant", "a9e9"), ("predict_from", "bogus"), ("device", "bogus"), ("dtype", torch.int8), ("dtype", "float16"),
    ("progress", 3),
]


@pytest.mark.parametrize("option,value", BAD_OPTIONS, ids=[f"{o}={v}" for o, v in BAD_OPTIONS])
def test_load_option_validated_before_any_work(tmp_path, option, value):
    """Checked first: the source does not even exist, and the error is about the option."""
    _one_line_value_error(lambda: offload.load(tmp_path / "missing", **{option: value}), option)


def test_memory_budget_needs_auto_cache(tiny_dir):
    _one_line_value_error(lambda: offload.load(tiny_dir, memory_budget=10**9), "memory_budget", "auto")


@pytest.mark.parametrize("where", ["missing_dir", "a_directory"])
def test_record_trace_to_an_unwritable_path_fails_at_load(tiny_dir, tmp_path, where):
    target = tmp_path / "nowhere" / "trace.jsonl" if where == "missing_dir" else tmp_path
    _one_line_value_error(lambda: offload.load(tiny_dir, record_trace=target), "record_trace", str(target))
    assert not (tmp_path / "nowhere").exists()


def test_record_trace_to_a_writable_path_still_records(tiny_dir, tmp_path):
    model = offload.load(tiny_dir, record_trace=tmp_path / "trace.jsonl")
    model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3)
    assert (tmp_path / "trace.jsonl").read_text().strip()
    assert [p.name for p in tmp_path.iterdir()] == ["trace.jsonl"]


@pytest.mark.parametrize("quant", ["a4e2", "bogus"])
def test_quant_on_a_packed_checkpoint(tiny_dir, tmp_path, quant):
    from offload.packed import convert

    packed = convert(tiny_dir, tmp_path / "packed")
    _one_line_value_error(lambda: offload.load(packed, quant=quant), "quant")
