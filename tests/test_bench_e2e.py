"""`offload-bench e2e` on a tiny OLMoE-shaped checkpoint, in a subprocess, for the contenders that need no build:
the JSON has every field, sane values and the bytes per token of the checkpoint (not timing)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from offload.bench.e2e import OLMOE_1B, active_bytes, make_checkpoint

BIN = Path(sys.executable).parent
TINY = OLMOE_1B | dict(vocab_size=512, hidden_size=128, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4, num_experts=8, num_experts_per_tok=2)
CONTENDERS = ["ours-resident-bf16", "ours-offloaded-bf16", "transformers", "transformers-accelerate"]


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


def test_active_bytes_counts_what_a_token_reads():
    """bf16: every parameter but the embedding table (one row) and the experts not routed to, at 2 bytes."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY))
    share = TINY["num_experts_per_tok"] / TINY["num_experts"]
    params = sum(p.numel() * (share if ".experts." in n else 1) for n, p in model.named_parameters()
                 if "embed_tokens" not in n) + TINY["hidden_size"]
    assert active_bytes(TINY, "bf16") == 2 * params
    assert active_bytes(TINY, "a4e2") < active_bytes(TINY, "a4e4") < active_bytes(TINY, "bf16")


def test_unknown_contender_is_refused():
    done = subprocess.run([str(BIN / "offload-bench"), "e2e", "--contenders", "llama.cpp-q3"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0 and "llama.cpp-q3" in done.stderr
