"""Tokenizer files that are broken or disagree with the model, and chat templates that would run or grow without
bound: one-line ModelFormatErrors naming the file and the fix; templates are rejected within a bounded amount of
work and output, while real templates render exactly as transformers renders them."""
from __future__ import annotations

import shutil
import tracemalloc
from pathlib import Path

import pytest
from hf_tiny import save_tiny
from tiny_tokenizer import CORPUS, VOCAB_SIZE, save_tokenizer
from one_line import raises_one_line

import offload
from offload import ModelFormatError
from offload.checkpoint import DEMO_DIR

CHAT = [{"role": "user", "content": "hello wörld"}]


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("text")
    save_tiny("olmoe", directory, vocab_size=VOCAB_SIZE, num_hidden_layers=2)
    save_tokenizer(directory)
    return directory


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def _fails(call, *parts: str) -> str:
    return raises_one_line(call, ModelFormatError, *parts)


@pytest.mark.parametrize("file,content", [
    ("tokenizer.json", "{}"), ("tokenizer.json", "[]"), ("tokenizer.json", '{"model": 3}'), ("tokenizer.json", "{"),
    ("tokenizer_config.json", "[]"), ("tokenizer_config.json", "{"), ("tokenizer_config.json", '"TokenizersBackend"'),
    ("tokenizer_config.json", '{"tokenizer_class": ["TokenizersBackend"]}'),
])
@pytest.mark.parametrize("entry", ["text", "chat"])
def test_broken_tokenizer_file(text_dir, tmp_path, file, content, entry):
    path = _copy(text_dir, tmp_path)
    (path / file).write_text(content)
    model = offload.load(path)
    prompt = "hello" if entry == "text" else CHAT
    _fails(lambda: model.generate(prompt, max_new_tokens=2), "tokenizer", str(path))


def test_tokenizer_larger_than_the_vocabulary(tmp_path):
    save_tiny("olmoe", tmp_path, vocab_size=256, num_hidden_layers=2)
    save_tokenizer(tmp_path)  # 300 tokens
    model = offload.load(tmp_path)
    _fails(lambda: model.generate(CORPUS[0], max_new_tokens=2), "300", "vocab_size", "256")


# --- chat templates ----------------------------------------------------------------------------------------------

HOSTILE = {
    "nested_ranges": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "nested_ranges_output": "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
    "string_times_int": "{{ 'A' * 100000000 }}",
    "string_times_float": "{{ 'A' * 1e8 }}",
    "list_times_int": "{% set xs = [1] * 1000000000 %}{{ xs | length }}",
    "power": "{{ 10 ** (10 ** 8) }}",  # jinja reads 10 ** 10 ** 8 as (10 ** 10) ** 8
    "filter_width": "{{ 'x' | center(1000000000) }}",
    "method_width": "{{ 'x'.ljust(1000000000) }}",
    "output_size": "{% for i in range(100000) %}{{ 'A' * 1000 }}{% endfor %}",
    "percent_width": "{{ '%*d' % (1000000000, 1) }}",
    "format_width": "{{ '{:>1000000000}'.format(1) }}",
    "raise_exception": "{{ raise_exception('only user and assistant roles are supported') }}",
    "syntax": "{% for m in messages %}",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_chat_template_is_rejected_before_it_grows(text_dir, tmp_path, name):
    path = _copy(text_dir, tmp_path)
    (path / "chat_template.jinja").write_text(HOSTILE[name])
    model = offload.load(path)
    model.tokenizer  # loading it is not what is measured
    tracemalloc.start()
    try:
        _fails(lambda: model.generate(CHAT, max_new_tokens=2), "chat template", str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20, f"the template was refused only after building {peak / 2**20:.0f} MiB"


def test_long_conversation_within_limits_renders(text_dir):
    """A legitimately long chat is not mistaken for a runaway template."""
    model = offload.load(text_dir)
    chat = [{"role": "user" if i % 2 == 0 else "assistant", "content": CORPUS[i % len(CORPUS)]} for i in range(2000)]
    expected = model.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    from offload.chat import render_chat

    assert render_chat(model.tokenizer, chat, str(text_dir)) == expected


@pytest.mark.parametrize("source", ["demo", "tiny"])
def test_templates_render_as_transformers_does(text_dir, source):
    tok = offload.load(DEMO_DIR if source == "demo" else text_dir).tokenizer
    from offload.chat import render_chat

    chats = [CHAT, [{"role": "system", "content": "be brief"}, {"role": "user", "content": "What is 2+2?"},
                    {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}]]
    for chat in chats:
        assert render_chat(tok, chat, "here") == tok.apply_chat_template(chat, add_generation_prompt=True,
                                                                          tokenize=False)


def test_template_with_generation_tags_and_namespaces(text_dir, tmp_path):
    """transformers' template extensions ({% generation %}, namespace(), tojson) keep working."""
    path = _copy(text_dir, tmp_path)
    (path / "chat_template.jinja").write_text(
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}<|{{ m.role }}|>"
        "{% generation %}{{ m.content | tojson }}{% endgeneration %}</s>{% endfor %}{{ ns.n }}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tok = offload.load(path).tokenizer
    from offload.chat import render_chat

    assert render_chat(tok, CHAT, "here") == tok.apply_chat_template(CHAT, add_generation_prompt=True,
                                                                      tokenize=False)
