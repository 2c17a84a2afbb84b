"""The model's tokenizer is what AutoTokenizer gives, whichever class tokenizer_config.json names: the generic
class is taken directly (faster), any other through AutoTokenizer."""
import json

import pytest
from hf_tiny import save_tiny
from tiny_tokenizer import CORPUS, VOCAB_SIZE, save_tokenizer
from transformers import AutoTokenizer

import offload


@pytest.mark.parametrize("tokenizer_class", ["TokenizersBackend", "PreTrainedTokenizerFast", "Qwen2Tokenizer"])
def test_tokenizer_equals_autotokenizers(tmp_path, tokenizer_class):
    save_tiny("qwen3_moe", tmp_path, vocab_size=VOCAB_SIZE)
    save_tokenizer(tmp_path)
    config_file = tmp_path / "tokenizer_config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"tokenizer_class": tokenizer_class}))
    ours, reference = offload.load(tmp_path).tokenizer, AutoTokenizer.from_pretrained(tmp_path)
    assert type(ours) is type(reference)
    chat = [{"role": "user", "content": CORPUS[2]}]
    assert ours.apply_chat_template(chat, add_generation_prompt=True) == reference.apply_chat_template(
        chat, add_generation_prompt=True)
    ids = reference(CORPUS[0])["input_ids"]
    assert ours(CORPUS[0])["input_ids"] == ids and ours.decode(ids) == reference.decode(ids)
