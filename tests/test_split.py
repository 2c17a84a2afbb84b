"""The CPU + GPU expert split (placement "split"), its CPU side tested with the CPU as the 'device': hot experts
in device slots, the others computed on the host worker while the caller computes the hot ones; outputs equal
resident bit for bit; the planner chooses the split from measured costs and says why."""
import json
import threading
from collections import Counter

import pytest
import torch

import offload
from offload.engine.planner import Link, kv_bytes, plan
from offload.engine.split import hot_experts
from offload.engine.trace import read_trace
from offload.model import moe as moe_module


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from hf_tiny import save_tiny

    path = tmp_path_factory.mktemp("split")
    save_tiny("qwen3_moe", path, moe_intermediate_size=64)
    return path


@pytest.mark.parametrize("quant", [None, "a4e2"])
def test_split_equals_resident_and_runs_cold_experts_on_the_worker(checkpoint, monkeypatch, quant):
    threads = []
    real = moe_module.run_on_host
    monkeypatch.setattr(moe_module, "run_on_host",
                        lambda *a: threads.append(threading.current_thread().name) or real(*a))
    resident = offload.load(checkpoint, quant=quant)
    split = offload.load(checkpoint, quant=quant, cache_experts=2, placement="split")
    ids = torch.randint(1, 256, (2, 12), generator=torch.Generator().manual_seed(5))
    assert torch.equal(split.forward(ids), resident.forward(ids))
    prompt = ids[:1, :6]
    assert torch.equal(split.generate(prompt, max_new_tokens=12), resident.generate(prompt, max_new_tokens=12))
    stats = split.stats()
    assert stats["placement"] == "split" and stats["hits"] > 0 and stats["cpu_computed"] > 0, stats
    assert stats["bytes_copied"] == 0  # on a CPU the slots are the host blobs: nothing moves
    assert threads and set(threads) == {"offload-host-experts_0"}


def test_cold_experts_run_while_the_caller_computes_the_hot_ones(checkpoint, monkeypatch):
    """Event ordering, not timing: the caller, inside its hot experts' compute, waits until the worker has
    finished the cold ones; run one after the other, it would wait in vain."""
    model = offload.load(checkpoint, cache_experts=2, placement="split")  # hot: experts 0 and 1 of every layer
    resident = offload.load(checkpoint)
    spec, layer = model.spec, model.spec.moe_layers[0]
    started, host_done, seen = threading.Event(), threading.Event(), []
    real = moe_module._run_batch

    def ordered(*args):
        if threading.current_thread() is threading.main_thread():
            started.set()
            seen.append(("caller saw the worker finish", host_done.wait(10)))
            return real(*args)
        seen.append(("worker saw the caller start", started.wait(10)))
        out = real(*args)
        host_done.set()
        return out

    x = torch.randn(1, 1, spec.hidden_size, generator=torch.Generator().manual_seed(1))
    weights, ids = torch.tensor([[0.7, 0.3]]), torch.tensor([[1, 5]])  # expert 1 hot, expert 5 cold
    with torch.inference_mode():
        want = moe_module.moe(x, layer, weights, ids, spec.router, spec.expert, resident.decoder.experts, [], 0)
        monkeypatch.setattr(moe_module, "_run_batch", ordered)
        got = moe_module.moe(x, layer, weights, ids, spec.router, spec.expert, model.decoder.experts, [], 0)
    assert sorted(seen) == [("caller saw the worker finish", True), ("worker saw the caller start", True)]
    assert torch.equal(got, want)


def test_hot_experts_from_a_trace_and_adapted_at_run_time(checkpoint, tmp_path):
    resident = offload.load(checkpoint)
    trace = tmp_path / "routing.jsonl"
    prompt = torch.randint(1, 256, (1, 6), generator=torch.Generator().manual_seed(2))
    recorded = offload.load(checkpoint, cache_experts=2, placement="split", record_trace=trace)
    want = recorded.generate(prompt, max_new_tokens=10)
    rows = [json.loads(line) for line in trace.read_text().splitlines()]
    for layer in recorded.spec.moe_layers:  # the trace's most routed, counted here from its JSON
        count = Counter(e for r in rows if r["layer"] == layer for e in r["experts"])
        top = sorted(count, key=lambda e: (-count[e], e))[:2]
        assert hot_experts(read_trace(trace), recorded.spec.moe_layers, 2, 8)[layer] == top
    from_trace = offload.load(checkpoint, cache_experts=2, placement="split", hot_trace=trace)
    assert from_trace.stats()["hot_experts"] == hot_experts(read_trace(trace), from_trace.spec.moe_layers, 2, 8)
    assert torch.equal(from_trace.generate(prompt, max_new_tokens=10), want)

    with pytest.raises(ValueError, match="hot_trace"):
        offload.load(checkpoint, cache_experts=2, placement="inclusive", hot_trace=trace)
    adapting = offload.load(checkpoint, cache_experts=2, placement="split")
    adapting.decoder.experts.adapt_every = 1  # re-place before every call: outputs must not change
    assert torch.equal(adapting.generate(prompt, max_new_tokens=10), resident.generate(prompt, max_new_tokens=10))
    engine = adapting.decoder.experts
    engine.rebalance()
    for layer, routed in engine.routed.items():
        hot = set(engine.on_device[layer])
        assert min(routed[e] for e in hot) >= max((routed[e] for e in range(8) if e not in hot), default=0)
    assert engine.stats()["hot_experts"] != {layer: [0, 1] for layer in engine.routed}


def test_planner_chooses_the_split_from_measured_costs():
    """Slots for 2 experts a layer (of the demo's 16) on a GPU: computing a missed expert on the CPU beats copying it on a slow
    link (split), not on a fast one (copy it in); explain() says which and why."""
    spec = offload.load("demo").spec
    blob, dense = 4 << 20, 10**8
    room = dense + kv_bytes(spec, 512, 2) + 2 * len(spec.moe_layers) * blob + blob // 2
    common = dict(dense_bytes=dense, expert_bytes=blob, device=torch.device("cuda"), dtype_bytes=2, context=512,
                  free_device=int(room / 0.9) + 1, host_available=10**12)
    slow_link = plan(spec, **common, link=Link(copy_gbps=2.0, cpu_expert_seconds=0.5e-3))  # copy: 2.1 ms
    assert slow_link.slots_per_layer == 2 and slow_link.placement == "split"
    rows = dict(slow_link.rows())
    assert rows["placement"] == "split" and "faster than the link copies it (2.10 ms)" in rows["why"]
    assert rows["host->device copy (measured)"].startswith("2.0 GB/s") and "0.50 ms" in rows["why"]
    text = slow_link.explain()
    assert all(word in text for word in ("why", "split", "2.0 GB/s", "CPU expert, 1 token (measured)"))
    fast_link = plan(spec, **common, link=Link(copy_gbps=25.0, cpu_expert_seconds=0.5e-3))  # copy: 0.17 ms
    assert fast_link.placement == "inclusive" and "missed experts are copied" in dict(fast_link.rows())["why"]
    assert plan(spec, **common).placement == "inclusive"  # nothing measured: no split
    on_cpu = plan(spec, **(common | {"device": torch.device("cpu")}), link=Link(2.0, 0.5e-3))
    assert on_cpu.placement == "inclusive"  # the CPU is the device: nothing to split


def test_split_bench_runs_every_setup_with_resident_tokens(checkpoint, tmp_path):
    from offload.bench.split import SETUPS, run

    result = run(checkpoint, device="cpu", tokens=4, prompt_tokens=4, runs=1, json_out=tmp_path / "split.json")
    assert set(result["tok_s"]) == set(SETUPS) and all(result["identical_tokens"].values())
    assert result["cpu_computed"]["split, cold experts on the CPU worker"] > 0
    assert json.loads((tmp_path / "split.json").read_text())["device"] == "cpu"
