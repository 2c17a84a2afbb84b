"""Offloaded experts (few device slots per layer, prefetch on/off) give exactly the resident results."""
import pytest
import torch

import offload


@pytest.mark.parametrize("prefetch", [0, 1])
def test_offloaded_equals_resident(tiny, prefetch):
    arch, path, _ = tiny
    resident = offload.load(path)
    model = offload.load(path, cache_experts=2, prefetch=prefetch)
    ids = torch.randint(1, 256, (2, 24), generator=torch.Generator().manual_seed(4))
    assert torch.equal(model.forward(ids), resident.forward(ids))
    prompt = ids[:1, :8]
    assert torch.equal(model.generate(prompt, max_new_tokens=32), resident.generate(prompt, max_new_tokens=32))
    stats = model.stats()
    assert stats["hits"] > 0 and stats["misses"] > 0, stats
    if prefetch:
        assert stats["prefetch_issued"] > 0 and stats["prefetch_used"] > 0, stats
        assert 0 < stats["prediction_recall"] <= 1
    else:
        assert stats["prefetch_issued"] == 0


def test_cpu_misses_trace_and_auto_plan(tmp_path):
    """Fiddler-style CPU misses give the same tokens; the trace follows the shared schema; the planner
    sizes the cache from a memory budget."""
    from hf_tiny import save_tiny

    from offload.engine.trace import read_trace

    save_tiny("mixtral", tmp_path / "m")
    resident = offload.load(tmp_path / "m")
    trace = tmp_path / "routing.jsonl"
    model = offload.load(tmp_path / "m", cache_experts=2, miss_policy="cpu", record_trace=trace)
    prompt = torch.randint(1, 256, (2, 6), generator=torch.Generator().manual_seed(7))
    assert torch.equal(model.generate(prompt, max_new_tokens=10), resident.generate(prompt, max_new_tokens=10))
    stats = model.stats()
    assert stats["cpu_computed"] > 0 and stats["bytes_copied"] < 10 * 2 * 4 * 4 * 64 * 96 * 3 * 4
    rows = read_trace(trace)
    assert {r.seq for r in rows} == {0, 1} and {r.layer for r in rows} == {0, 1, 2, 3}
    assert {r.token for r in rows} == set(range(9))  # decode steps after the prefill
    assert all(len(r.experts) == 2 and r.probs[0] >= r.probs[1] for r in rows)

    from offload.engine.planner import kv_bytes, plan
    spec, blob = resident.spec, 75_000
    room = 10**6 + kv_bytes(spec, 512, 4) + 2 * 4 * blob + blob // 2  # 2.5 slots for each of 4 layers
    p = plan(spec, dense_bytes=10**6, expert_bytes=blob, device=torch.device("cpu"), dtype_bytes=4,
             context=512, free_device=int(room / 0.9) + 1, host_available=10**9)
    assert p.slots_per_layer == 2 and p.placement == "inclusive"
    assert "expert slots per MoE layer" in p.explain()


def test_global_memory_budget_sizes_the_cache(tmp_path):
    from hf_tiny import save_tiny
    from offload.engine.planner import kv_bytes

    save_tiny("olmoe", tmp_path)
    probe = offload.load(tmp_path, cache_experts=1)
    blob = probe.decoder.experts.store.blob_bytes
    dense = sum(t.nbytes for layer in probe.decoder.layers for part in layer.values()
                for t in (part.values() if isinstance(part, dict) else [part]))
    dense += sum(t.nbytes for t in (probe.decoder.embed, probe.decoder.norm, probe.decoder.lm_head))
    layers = len(probe.spec.moe_layers)
    budget = int((dense + kv_bytes(probe.spec, 4096, 4) + 3 * layers * blob + blob // 2) / 0.9) + 1
    model = offload.load(tmp_path, cache_experts="auto", memory_budget=budget)
    assert model.plan.slots_per_layer == 3
    assert model.decoder.experts.slots[0].capacity == 3
    ids = torch.randint(1, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.generate(ids, max_new_tokens=6), offload.load(tmp_path).generate(ids, max_new_tokens=6))


def test_prefetch_from_layer_output_changes_nothing(tmp_path):
    from hf_tiny import save_tiny

    save_tiny("mimo_v2_flash", tmp_path)
    model = offload.load(tmp_path, cache_experts=2, predict_from="output")
    ids = torch.randint(1, 256, (1, 8), generator=torch.Generator().manual_seed(2))
    assert torch.equal(model.generate(ids, max_new_tokens=16), offload.load(tmp_path).generate(ids, max_new_tokens=16))
    stats = model.stats()
    assert stats["prefetch_issued"] > 0 and stats["prefetch_used"] > 0 and stats["prediction_recall"] > 0


def test_lookup_policy_reads_the_engines_routing(tmp_path):
    """The engine records each decoded token's routing, every layer in one row, as the trace recorder
    sees it; the lookup policy reading it changes no output."""
    from hf_tiny import save_tiny

    from offload.engine.trace import read_trace

    save_tiny("qwen3_moe", tmp_path / "m")
    trace = tmp_path / "routing.jsonl"
    model = offload.load(tmp_path / "m", cache_experts=2, policy="lookup", record_trace=trace)
    prompt = torch.randint(1, 256, (1, 6), generator=torch.Generator().manual_seed(3))
    out = model.generate(prompt, max_new_tokens=24)
    assert torch.equal(out, offload.load(tmp_path / "m").generate(prompt, max_new_tokens=24))
    history = model.decoder.experts.history
    rows = read_trace(trace)
    tokens = max(r.token for r in rows) + 1
    assert history.tokens == tokens
    for r in rows:
        assert history.routed(tokens - 1 - r.token, r.layer) == r.experts, r
    assert model.stats()["hits"] > 0
