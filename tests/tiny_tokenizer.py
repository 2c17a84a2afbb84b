"""A tiny byte-level BPE tokenizer with a chat template, trained in-process, saved beside a tiny checkpoint."""
from __future__ import annotations

from pathlib import Path

CORPUS = ["héllo wörld 日本語 🙂", "the quick brown fox jumps over the lazy dog", "café naïve 東京 こんにちは 🙂🙃",
          "hello world, hello there: the end.", "über straße ça va? 日本 東京 語"]
SPECIALS = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
VOCAB_SIZE = 300  # 5 specials + 256 bytes + 39 merges, some of which split multi-byte characters


def save_tokenizer(directory: Path):
    """Train the tokenizer, save tokenizer.json + tokenizer_config.json (+ chat template) and return it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 20, trainer)
    assert tok.get_vocab_size() == VOCAB_SIZE
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   chat_template=CHAT_TEMPLATE)
    fast.save_pretrained(directory)
    return fast
