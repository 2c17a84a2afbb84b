"""`offload-bench e2e` on a tiny OLMoE-shaped checkpoint, in a subprocess, for the contenders that need no build:
the JSON has every field, sane values and the bytes per token of the checkpoint (not timing)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from offload.bench.e2e import OLMOE_1B, QWEN3_5_2B, active_bytes, make_checkpoint
from offload.packed import is_packed

import offload

BIN = Path(sys.executable).parent
TINY = OLMOE_1B | dict(vocab_size=512, hidden_size=128, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2)
TINY_QWEN3_5 = QWEN3_5_2B | dict(vocab_size=512, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                 head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                                 linear_value_head_dim=16, num_experts=8, num_experts_per_tok=2,
                                 moe_intermediate_size=32, shared_expert_intermediate_size=32)
CONTENDERS = ["ours-resident-bf16", "ours-resident-a4e2", "ours-offloaded-bf16", "transformers",
              "transformers-accelerate"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("e2e") / "olmoe", TINY)
    out = path.parent / "e2e.json"
    done = subprocess.run([str(BIN / "offload-bench"), "e2e", "--model", str(path), "--contenders",
                           ",".join(CONTENDERS), "--rounds", "1", "--reps", "1", "--tokens", "8",
                           "--prompt-tokens", "8", "--threads", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text()), done.stdout


def test_every_contender_reports_every_field(report):
    results, table = report
    assert results["skipped"] == {}
    assert set(results["contenders"]) == set(CONTENDERS)
    assert results["read_bandwidth"]["median"] > 1e8
    for name, r in results["contenders"].items():
        assert name in table
        for key in ("decode_tok_s", "prefill_tok_s", "ttft_s", "load_s"):
            assert 0 < r[key]["min"] <= r[key]["median"] <= r[key]["max"], (name, key, r[key])
        assert r["peak_rss"] >= r["rss_end"] > 50e6
        assert r["roofline_fraction"] > 0 and r["runs"] == 1 and r["failed_runs"] == []
        assert len(r["tokens"]) == 8 and all(0 <= t < TINY["vocab_size"] for t in r["tokens"])


def test_offloaded_generates_what_resident_generates(report):
    contenders = report[0]["contenders"]
    assert contenders["ours-offloaded-bf16"]["tokens"] == contenders["ours-resident-bf16"]["tokens"]


@pytest.mark.parametrize("config", [TINY, TINY_QWEN3_5], ids=["olmoe", "qwen3_5_moe"])
def test_active_bytes_counts_what_a_token_reads(config):
    """bf16: every parameter but the embedding table (one row) and the experts not routed to, at 2 bytes."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    share = config["num_experts_per_tok"] / config["num_experts"]
    params = sum(p.numel() * (share if ".experts." in n else 1) for n, p in model.named_parameters()
                 if "embed_tokens" not in n) + config["hidden_size"]
    assert active_bytes(config, "bf16") == 2 * params
    assert active_bytes(config, "a4e2") < active_bytes(config, "a4e4") < active_bytes(config, "bf16")


def test_qwen3_5_shape_checkpoint_loads(tmp_path):
    """The generated Qwen3.5-MoE-shaped checkpoint (`--shape qwen3_5_moe`, here scaled down) is one our loader
    and transformers both read, with the same greedy tokens."""
    path = make_checkpoint(tmp_path / "qwen3_5", TINY_QWEN3_5)
    ids = torch.randint(1, TINY_QWEN3_5["vocab_size"], (1, 70), generator=torch.Generator().manual_seed(0))
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    expected = ref.generate(ids, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert offload.load(path, dtype=torch.float32).generate(ids, max_new_tokens=4).tolist() == expected.tolist()


def test_quantized_contenders_load_a_pack_converted_once(report, tmp_path_factory):
    """ours-resident-a4e2 loads the packed checkpoint written beside the model (as llama.cpp opens its GGUF)."""
    packed = Path(report[0]["checkpoint"]).with_name("olmoe-a4e2")
    assert is_packed(packed)
    assert report[0]["contenders"]["ours-resident-a4e2"]["tokens"] == offload.load(packed).generate(
        torch.tensor([report[0]["prompt"]]), max_new_tokens=8)[0, -8:].tolist()


def test_cpu_only_contenders_are_skipped_on_a_gpu(tmp_path):
    from offload.bench.e2e import run

    path = make_checkpoint(tmp_path / "olmoe", TINY)
    results = run(path, ["llama.cpp-bf16", "transformers-accelerate"], rounds=1, threads=1, device="cuda")
    assert set(results["skipped"]) == {"llama.cpp-bf16", "transformers-accelerate"}
    assert all("CPU only" in reason for reason in results["skipped"].values())


def test_unknown_contender_is_refused():
    done = subprocess.run([str(BIN / "offload-bench"), "e2e", "--contenders", "llama.cpp-q3"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0 and "llama.cpp-q3" in done.stderr
