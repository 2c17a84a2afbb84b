"""The bundled demo model (offload/demo): transformers loads it, it answers held-out tasks, it is small, and
its MTP layer is stored under the documented names. Numbers and the retraining command: docs/demo_model.md."""
from __future__ import annotations

import functools
import importlib.util
import json
import random
import re
from pathlib import Path

import pytest
import torch

from offload.demo import evaluation, tasks

DEMO = Path(__file__).resolve().parents[1] / "offload" / "demo"
CHECKPOINT_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                    "tokenizer_config.json", "chat_template.jinja")
# exact match of the shipped checkpoint on the sets the test measures (50 first turns, the later turns of 20
# conversations, 50 unseen phrasings; transformers greedy, 2026-12-05; larger sets: docs/demo_model.md)
MEASURED = {"first turn": 1.00, "later turns": 1.00, "unseen phrasings": 1.00}

pytestmark = pytest.mark.skipif(not (DEMO / "model.safetensors").exists(), reason="demo checkpoint not built")


@pytest.fixture(scope="module")
def demo():
    from transformers import AutoTokenizer, MiMoV2FlashForCausalLM

    model = MiMoV2FlashForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(DEMO)


def test_files_and_size():
    for name in CHECKPOINT_FILES:
        assert (DEMO / name).is_file(), name
    size = sum((DEMO / name).stat().st_size for name in CHECKPOINT_FILES)
    assert size <= 30 * 2**20, f"demo checkpoint is {size / 2**20:.1f} MB"


def test_config_is_mimo_v2_flash():
    config = json.loads((DEMO / "config.json").read_text())
    assert config["model_type"] == "mimo_v2_flash"
    assert config["architectures"] == ["MiMoV2FlashForCausalLM"]
    n = config["num_hidden_layers"]
    assert config["layer_types"] == ["full_attention" if i == 0 or (i + 1) % 6 == 0 else "sliding_attention"
                                     for i in range(n)]
    assert config["mlp_layer_types"] == ["dense"] + ["sparse"] * (n - 1)
    assert config["n_routed_experts"] >= 16 and config["num_experts_per_tok"] >= 2
    generation = json.loads((DEMO / "generation_config.json").read_text())
    assert generation["eos_token_id"] == config["eos_token_id"]


def test_tensors_and_mtp_layout():
    from safetensors import safe_open

    config = json.loads((DEMO / "config.json").read_text())
    h, heads = config["hidden_size"], config["num_attention_heads"]
    d, dv, kv = config["head_dim"], config["v_head_dim"], 2 * config["num_key_value_heads"]  # sliding: 2x kv
    inter = config["intermediate_size"]
    expected = {
        "enorm.weight": [h], "hnorm.weight": [h], "eh_proj.weight": [h, 2 * h],
        "input_layernorm.weight": [h], "post_attention_layernorm.weight": [h], "final_layernorm.weight": [h],
        "self_attn.q_proj.weight": [heads * d, h], "self_attn.k_proj.weight": [kv * d, h],
        "self_attn.v_proj.weight": [kv * dv, h], "self_attn.o_proj.weight": [h, heads * dv],
        "self_attn.attention_sink_bias": [heads],
        "mlp.gate_proj.weight": [inter, h], "mlp.up_proj.weight": [inter, h], "mlp.down_proj.weight": [h, inter],
    }
    with safe_open(DEMO / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        mtp = {k[len("model.mtp.layers.0."):]: list(f.get_slice(k).get_shape())
               for k in keys if k.startswith("model.mtp.")}
        assert mtp == expected
        # the MTP attention has the shapes of a main sliding layer
        sliding = config["layer_types"].index("sliding_attention")
        for name in ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "attention_sink_bias"):
            assert list(f.get_slice(f"model.layers.{sliding}.self_attn.{name}").get_shape()) == expected[f"self_attn.{name}"]
    assert "model.layers.0.self_attn.attention_sink_bias" not in keys  # full layers have no sinks


def test_loads_in_transformers(demo):
    model, tokenizer = demo
    assert type(model).__name__ == "MiMoV2FlashForCausalLM"
    assert model.config.model_type == "mimo_v2_flash"
    assert tokenizer.eos_token == "<|end|>" and tokenizer.bos_token and tokenizer.pad_token
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt == "<|bos|><|user|>What is 2 + 3?<|end|><|assistant|>"


def _replies(demo, chats: list[list[dict]]) -> list[str]:
    model, tokenizer = demo
    prompts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=48)
    return tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("split", sorted(MEASURED))
def test_heldout_exact_match(demo, split):
    """First turns, later turns (after the model's own earlier replies) and unseen phrasings, each at least
    its measured accuracy minus 10 points."""
    reply = lambda chats: _replies(demo, chats)  # noqa: E731
    if split == "first turn":
        result = evaluation.single_turn(reply, tasks.heldout(50))
    elif split == "later turns":
        result = evaluation.later_turns(reply, tasks.heldout_conversations(20))
    else:
        result = evaluation.single_turn(reply, tasks.unseen(50))
    floor = MEASURED[split] - 0.10
    assert result["exact_match"] >= floor, (split, result)


def test_heldout_is_deterministic_and_disjoint_from_training():
    assert tasks.heldout(20) == tasks.heldout(20)
    assert tasks.heldout_conversations(5) == tasks.heldout_conversations(5)
    rng = random.Random(0)
    trained = [tasks.make_conversation(rng) for _ in range(3000)]
    questions = {q for _, turns in trained for _, q, _ in turns}
    assert {len(turns) for _, turns in trained} == {1, 2, 3, 4}
    assert not questions & {q for _, q, _ in tasks.heldout(500)}
    assert not questions & {q for _, turns in tasks.heldout_conversations(200) for _, q, _ in turns}
    unseen = tasks.unseen(500)
    assert {kind for kind, _, _ in unseen} == set(tasks.KINDS)
    assert not questions & {q for _, q, _ in unseen}  # unseen phrasings: never in the training stream
    assert tasks.is_correct(" 3 + 4 = 7 ", "3 + 4 = 7") and not tasks.is_correct("3 + 4 = 8", "3 + 4 = 7")


@functools.cache
def _trained(kind: str) -> dict[str, str]:
    rng = random.Random(2)
    return dict(tasks.make_task(rng, kind) for _ in range(20000))


@pytest.mark.parametrize("kind, question, answer", [
    ("add", "What is 23 + 58?", "23+58=81"), ("add", "Add 23 and 58", "23+58=81"),
    ("sub", "Subtract 29 from 81.", "81-29=52"), ("sort", "Sort 42, 7, 19, 88", "7, 19, 42, 88"),
    ("sort", "Sort: 9, 2, 7", "2, 7, 9"), ("count", "How many letters a in banana?", "b a(1) n a(2) n a(3) = 3"),
    ("add", "What is 123+456?", tasks.REFUSAL)])
def test_the_issue_phrasings_are_trained_phrasings(kind, question, answer):
    """The phrasings a user tried (issue 18) are in the training distribution, with these answers."""
    pairs = _trained(kind)
    frame_of = lambda q: re.sub(r"\d+", "#", q)  # noqa: E731
    assert frame_of(question) in {frame_of(q) for q in pairs if pairs[q] != tasks.REFUSAL or answer == tasks.REFUSAL}
    if question in pairs:
        assert pairs[question] == answer


def test_training_encoding_is_the_chat_template():
    """The trainer encodes a chat piece by piece and learns only the replies; the runtime renders the chat
    template whole. Both must give the same ids, or the model is trained on one format and asked another."""
    spec = importlib.util.spec_from_file_location("train_demo", DEMO.parents[1] / "scripts" / "train_demo.py")
    train_demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_demo)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(DEMO)
    rng = random.Random(3)
    for _ in range(50):
        system, turns = tasks.make_conversation(rng)
        chat = tasks.messages(system, turns) + [{"role": "assistant", "content": turns[-1][2]}]
        expected = tokenizer(tokenizer.apply_chat_template(chat, tokenize=False), add_special_tokens=False)["input_ids"]
        ids, learn = train_demo.encode_chat(tokenizer, turns, system)
        assert ids == expected
        learned = tokenizer.decode([t for t, m in zip(ids, learn) if m])
        assert learned == "".join(a + "<|end|>" for _, _, a in turns)
