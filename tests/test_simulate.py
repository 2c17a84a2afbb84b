"""offload-bench simulate: the timing pass against hand-worked timelines, the replay against cache_sim's independent
replay, and the fit reproducing figures generated with known parameters."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from offload.bench import sim_data, simulate
from offload.bench.cache_sim import simulate as cache_replay
from offload.bench.simulate import Costs, Params, Setup, Step


def test_timeline_by_hand():
    c = Costs(attention=1, expert=1, copy=3, cpu=5, head=0.5)
    # a hit runs at once, the demand copy lands at 1 + 3: done at 5; then the token's head
    assert simulate.seconds([Step(1, 1, (), 0, 0)], c, layers=1) == 5.5
    # the CPU's expert (1 -> 6) runs while the GPU computes two hits (1 -> 3), not after them
    assert simulate.seconds([Step(2, 0, (), 0, 1)], c, layers=1) == 6.5
    # layer 1 queues one prefetch behind its demand copy (1 -> 4 -> 7); layer 2 starts at 6, its prefetched
    # expert lands at 7: done at 8
    assert simulate.seconds([Step(1, 1, (), 1, 0), Step(0, 0, (0,), 0, 0)], c, layers=2) == 8.5


def test_replay_counts_misses_as_cache_sim_does():
    spec = simulate.model_spec("mixtral-8x7b")
    rows = simulate.uniform_trace(spec, tokens=12)
    steps = simulate.replay(simulate.decode_tokens(rows), Setup(3), spec.router.num_experts)
    independent = cache_replay(rows, "lru", 3)
    assert sum(s.hits for s in steps) == independent.hits and sum(s.demand for s in steps) == independent.misses


def test_prefetch_with_perfect_recall_leaves_only_the_first_layer_to_demand():
    spec = simulate.model_spec("mixtral-8x7b")
    tokens = simulate.decode_tokens(simulate.uniform_trace(spec, tokens=6))
    steps = simulate.replay(tokens, Setup(4, prefetch=2, recall=1.0), spec.router.num_experts)
    layers = len(spec.moe_layers)
    assert all(s.demand == 0 for i, s in enumerate(steps) if i % layers)
    assert sum(len(s.prefetched) for s in steps) > 0
    split = simulate.replay(tokens, Setup(2, hot={layer: [0, 1] for layer in spec.moe_layers}), 8)
    assert sum(s.cpu + s.hits for s in split) == 2 * len(steps) and sum(s.demand for s in split) == 0


def test_fit_reproduces_figures_made_with_known_parameters(monkeypatch):
    """(Kernel efficiency and fixed cost a layer trade off against each other: the figures are checked, not
    the parameters.)"""
    spec = simulate.model_spec("mixtral-8x7b")
    tokens = simulate.decode_tokens(simulate.uniform_trace(spec, tokens=8))
    truth = Params(link_eff=0.4, kernel_eff=0.2, layer_overhead=0.002, naive_link_eff=0.25, recall=0.8)
    made = simulate.paper_rows(tokens, truth, sim_data.FIT_ON)
    published = {a: {r["gpu"]: r["simulated"] for r in made if r["algorithm"] == a} for a in sim_data.PUBLISHED}
    monkeypatch.setattr(sim_data, "PUBLISHED", published)
    fitted, worst = simulate.fit(tokens)
    assert worst < 0.03
    for row in simulate.paper_rows(tokens, fitted, sim_data.FIT_ON):
        assert abs(row["simulated"] / published[row["algorithm"]][row["gpu"]] - 1) < 0.03


@pytest.mark.parametrize("preset, bits", [("a4e2", 2.5), ("paper", 3.0), ("mxfp4", 4.25)])
def test_expert_bytes_per_weight(preset, bits):
    spec = simulate.model_spec("mixtral-8x7b")
    per_weight = 8 * simulate.sizes(spec, preset).expert / (3 * spec.hidden_size * spec.expert.intermediate_size)
    assert per_weight == pytest.approx(bits, abs=0.07)  # + 8-bit meta of the meta: 1/16 bit


def test_cli_marks_every_line_as_a_simulation(tmp_path):
    spec = simulate.model_spec("mixtral-8x7b")
    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(json.dumps({"seq": r.seq, "token": r.token, "layer": r.layer, "experts": list(r.experts),
                                         "probs": list(r.probs)}) + "\n" for r in simulate.uniform_trace(spec, 4)))
    out = subprocess.run([str(Path(sys.executable).parent / "offload-bench"), "simulate", "--trace", str(trace), "--json",
                          str(tmp_path / "r.json")], capture_output=True, text=True, check=True)
    lines = out.stdout.strip().splitlines()
    assert len(lines) > 20 and all(line.startswith("[simulation]") for line in lines)
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["simulation"] is True and {r["gpu"] for r in result["paper"]} == {"T4", "RTX3060", "A100", "RTX3080M"}


def test_hybrid_model_reads_each_layer_kinds_projections():
    """Qwen3.5-35B-A3B: three Gated DeltaNet layers to one gated full-attention layer, plus a shared expert: the
    dense bytes a token reads per layer are their mean (sizes by hand from the published config)."""
    from offload.quant.presets import PRESETS

    q4 = PRESETS["a4e4"].attention.nbytes
    h = 2048
    deltanet = q4((2 * 16 * 128 + 32 * 128, h)) + q4((32 * 128, h)) + 2 * q4((32, h)) + q4((h, 32 * 128))
    full = q4((2 * 16 * 256, h)) + 2 * q4((2 * 256, h)) + q4((h, 16 * 256))
    shared = 2 * q4((512, h)) + q4((h, 512)) + q4((1, h))  # and its sigmoid gate
    size = simulate.sizes(simulate.model_spec("qwen3.5-35b-a3b"), "a4e4")
    assert size.dense_layer == (3 * deltanet + full) // 4 + shared + 2 * 256 * h + 4 * h
