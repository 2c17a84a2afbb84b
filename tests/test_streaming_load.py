"""Loading streams tensors: peak memory stays near the weights' own size, shards + index load like one file,
and the loaded model owns its memory (it does not keep views of the checkpoint files)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_tiny import save_tiny
from safetensors.torch import save_file

import offload

INDEX = "model.safetensors.index.json"

# Mixtral-shaped, tiny vocabulary, fat experts: 2 layers x 18 experts x 3 x (1024 x 512) fp32 = 226 MB of experts.
BIG = dict(vocab_size=256, hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
           num_key_value_heads=2, num_local_experts=18, num_experts_per_tok=2)
EXPERTS_PER_SHARD = 6


def _big_config() -> dict:
    return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "dtype": "float32",
            "hidden_act": "silu", "rms_norm_eps": 1e-5, "max_position_embeddings": 512, "sliding_window": None,
            "tie_word_embeddings": False, "bos_token_id": None, "eos_token_id": None, "pad_token_id": 0,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}, **BIG}


def _write_big_checkpoint(directory: Path) -> int:
    """Write the checkpoint shard by shard (never all of it in memory); returns the total tensor bytes."""
    c = BIG
    H, I, V, E = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_local_experts"]
    kv = c["num_key_value_heads"] * H // c["num_attention_heads"]
    g = torch.Generator().manual_seed(0)

    def w(*shape):
        return torch.randn(shape, generator=g) * 0.02

    shards: list[dict] = [{"model.embed_tokens.weight": w(V, H), "lm_head.weight": w(V, H),
                           "model.norm.weight": 1 + w(H)}]
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shards[0] |= {p + "input_layernorm.weight": 1 + w(H), p + "post_attention_layernorm.weight": 1 + w(H),
                      p + "self_attn.q_proj.weight": w(H, H), p + "self_attn.k_proj.weight": w(kv, H),
                      p + "self_attn.v_proj.weight": w(kv, H), p + "self_attn.o_proj.weight": w(H, H),
                      p + "block_sparse_moe.gate.weight": w(E, H)}
        shards += [{} for _ in range(0, E, EXPERTS_PER_SHARD)]  # filled lazily below
    n = len(shards)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map, total = {}, 0
    for i, (name, tensors) in enumerate(zip(names, shards)):
        if i > 0:  # expert shard: generated now, written, dropped
            layer, first = divmod((i - 1) * EXPERTS_PER_SHARD, E)
            for e in range(first, first + EXPERTS_PER_SHARD):
                p = f"model.layers.{layer}.block_sparse_moe.experts.{e}."
                tensors |= {p + "w1.weight": w(I, H), p + "w2.weight": w(H, I), p + "w3.weight": w(I, H)}
        save_file(tensors, directory / name, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, name)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        shards[i] = {}
    (directory / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(_big_config()))
    return total


MEASURE = r"""
import json, sys, torch, offload

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

try:  # reset VmHWM to the current RSS, so the import peak does not hide the load's
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
rss0, hwm0 = status("VmRSS"), status("VmHWM")
model = offload.load(sys.argv[1])
hwm1, rss1 = status("VmHWM"), status("VmRSS")

d = model.decoder
tensors = [d.embed, d.lm_head, d.norm]
tensors += [t for layer in d.layers for v in layer.values() for t in (v.values() if isinstance(v, dict) else [v])]
tensors += [t for e in d.experts.experts.values() for t in e.values()] + list(model.mtp.values())
storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
mapped = [l for l in open("/proc/self/maps") if sys.argv[1] in l]
logits = model.forward(torch.tensor([[1, 2, 3, 4]]))
print(json.dumps(dict(rss0=rss0, hwm0=hwm0, hwm1=hwm1, rss1=rss1, weights=sum(storages.values()),
                      experts=len(d.experts.experts), mapped=len(mapped), finite=bool(logits.isfinite().all()))))
"""


def test_load_streams_tensors_peak_rss(tmp_path):
    """Peak RSS growth while loading a 230 MB, 7-shard checkpoint stays < 1.5x the loaded weights."""
    path = tmp_path / "big"
    path.mkdir()
    total = _write_big_checkpoint(path)
    assert total >= 200e6
    assert len(list(path.glob("*.safetensors"))) >= 5
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True, env=env,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    m = json.loads(run.stdout.strip().splitlines()[-1])
    assert m["experts"] == BIG["num_hidden_layers"] * BIG["num_local_experts"]
    assert m["finite"]
    assert abs(m["weights"] - total) <= 0.01 * total, m  # every weight loaded, nothing duplicated
    growth = m["hwm1"] - m["rss0"]  # peak during the load over the RSS before it (strict if the reset failed)
    mb = lambda x: f"{x / 1e6:.0f} MB"  # noqa: E731
    detail = f"peak RSS growth {mb(growth)} for {mb(m['weights'])} of weights ({m})"
    assert growth < 1.5 * m["weights"], detail
    assert growth > 0.8 * m["weights"], "the measurement saw no load at all: " + detail
    assert m["mapped"] == 0, "the loaded model still maps checkpoint files"


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_sharded_with_index_matches_single_file(tmp_path, arch):
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    ref = save_tiny(arch, single, num_hidden_layers=2)
    ref.save_pretrained(sharded, max_shard_size="60KB")
    shards = sorted(sharded.glob("*.safetensors"))
    assert (sharded / INDEX).is_file() and len(shards) >= 3, shards
    assert not (single / INDEX).exists() and [p.name for p in single.glob("*.safetensors")] == ["model.safetensors"]
    ids = torch.randint(1, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    a, b = offload.load(single).forward(ids), offload.load(sharded).forward(ids)
    assert torch.equal(a, b)
    expected = ref(ids).logits
    assert (a - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_loaded_model_does_not_depend_on_the_files(tmp_path):
    """The weights are copies, not views of the shard files: rewriting the checkpoint in place (cp over it,
    rsync --inplace) must neither change a loaded model nor crash it."""
    path = tmp_path / "m"
    save_tiny("mixtral", path, num_hidden_layers=2)
    model = offload.load(path)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    before = model.forward(ids)
    file = path / "model.safetensors"
    assert not [line for line in open("/proc/self/maps") if str(file) in line]
    size = file.stat().st_size
    with open(file, "r+b") as f:  # same inode, new bytes
        f.seek(size // 4)
        f.write(b"\x00" * (size - size // 4))
    assert torch.equal(model.forward(ids), before)
