"""Run in a subprocess by offload.bench.llama_cpp: the vendored convert_hf_to_gguf.py (BF16) on a checkpoint,
or `llama_cpp.llama_model_quantize` on a GGUF.

The bench checkpoint has random weights and no tokenizer, and the benchmark feeds token ids, so the converter's
vocabulary step is replaced by a placeholder SentencePiece-style vocabulary of the config's size (<unk>, <s>,
</s>, the 256 byte tokens, then "t<i>"), and a config without "architectures" gets transformers' causal-LM
class for its model_type; every weight goes through the converter untouched.

    python -m offload.bench.llama_cpp_convert SRC CHECKPOINT OUT.gguf
    python -m offload.bench.llama_cpp_convert --quantize FTYPE IN.gguf OUT.gguf
"""
from __future__ import annotations

import sys
from pathlib import Path


def placeholder_vocab(model) -> None:
    """set_vocab for a checkpoint without a tokenizer: n_vocab distinct tokens, ids 1/2 as BOS/EOS."""
    import gguf

    n = model.hparams["vocab_size"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    tokens += [f"t{i}" for i in range(len(tokens), n)]
    types += [gguf.TokenType.NORMAL] * (n - len(types))
    writer = model.gguf_writer
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * n)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)


def convert(src: Path, checkpoint: Path, out: Path) -> None:
    sys.path[:0] = [str(src), str(src / "gguf-py")]
    import convert_hf_to_gguf
    from conversion.base import ModelBase

    found = convert_hf_to_gguf.get_model_class

    def with_placeholder_vocab(*args, **kwargs):
        cls = found(*args, **kwargs)
        cls.set_vocab = placeholder_vocab
        return cls

    convert_hf_to_gguf.get_model_class = with_placeholder_vocab
    read = ModelBase.load_hparams

    def with_architecture(dir_model: Path, is_mistral_format: bool) -> dict:
        """A config saved from AutoConfig.for_model names no architecture; transformers' causal-LM class is it."""
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        hparams = read(dir_model, is_mistral_format)
        if not hparams.get("architectures"):
            hparams["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[hparams["model_type"]]]
        return hparams

    ModelBase.load_hparams = staticmethod(with_architecture)
    sys.argv = ["convert_hf_to_gguf.py", "--outtype", "bf16", "--outfile", str(out), str(checkpoint)]
    convert_hf_to_gguf.main()


def quantize(ftype: int, source: Path, out: Path) -> None:
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama_model_quantize failed on {source}")


if __name__ == "__main__":
    if sys.argv[1] == "--quantize":
        quantize(int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
    else:
        convert(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
