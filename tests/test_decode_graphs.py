"""The CUDA-graph decode step (offload/model/decode_graphs.py) without the graph: everything a graph captures
runs here eagerly on the CPU, on real tiny checkpoints of every architecture. tests/test_cuda.py then checks
capture and replay on a GPU (replayed = eager, bit for bit)."""
import pytest
import torch

import offload
from offload.engine.offloaded import OffloadedExperts
from offload.engine.resident import ResidentExperts
from offload.model import kv_cache
from offload.model.decode_graphs import DecodeGraphs, StaticStep, unsupported
from offload.model.kv_cache import KVCache, bucket
from offload.model.moe import GROUPED_MAX_BYTES, moe, moe_on_device
from offload.spec import ExpertSpec, RouterSpec

from hf_tiny import ARCHS, save_tiny


@pytest.fixture
def grouped_on_cpu(monkeypatch):
    """The grouped expert path (a GPU's) on the CPU, where its products are tested."""
    monkeypatch.setitem(GROUPED_MAX_BYTES, "cpu", 1 << 30)
    monkeypatch.setattr(kv_cache, "CHUNK", 4)  # buckets of 4, 8, 16, 32: a short decode crosses three


def _greedy_steps(model, prompt: torch.Tensor, steps: int, run_step,
                  bucketed: bool = True) -> tuple[list[int], list[torch.Tensor]]:
    d = model.decoder
    tokens, logits = [], []
    cache = KVCache([layer.attention for layer in d.spec.layers], 1, prompt.shape[1] + steps, d.dtype, d.device,
                    preallocate=run_step is not None, bucketed=bucketed)
    positions = torch.arange(prompt.shape[1])[None]
    out = d.logits(d.hidden_states(prompt, cache, positions, torch.ones_like(prompt, dtype=torch.bool))[:, -1])
    static = StaticStep(d, 1)
    for _ in range(steps):
        token = out.argmax(-1)
        tokens.append(int(token))
        logits.append(out)
        ids, pos, valid = token[:, None], torch.tensor([[cache.length]]), torch.ones(1, 1, dtype=torch.bool)
        if run_step is None:
            out = d.logits(d.hidden_states(ids, cache, pos, valid)[:, -1])
        else:
            static.load(ids, cache, pos, valid)
            out = d.logits(static.run(cache)[:, -1])
            cache.length += 1
    return tokens, logits


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_static_step_equals_eager_decode(arch, tmp_path, grouped_on_cpu):
    """The step a graph captures (static buffers, preallocated cache, keys in buckets, experts stacked and
    routed on the device) gives the eager step's logits bit for bit, and the plain decode's to rounding."""
    save_tiny(arch, tmp_path)
    prompt = torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(1))
    steps = 24  # positions 6..30: buckets 8, 16 and 32
    model = offload.load(tmp_path, device="cpu")
    d = model.decoder
    reason = unsupported(d)
    if reason is not None:  # MLA / Gated DeltaNet: decoded eagerly, and said why
        assert arch in ("qwen3_5_moe", "deepseek_v2", "deepseek_v3") and "not captured" in reason
        return
    assert arch not in ("qwen3_5_moe", "deepseek_v2", "deepseek_v3")
    d.experts = ResidentExperts(dict(d.experts.experts), stack=True)
    assert DecodeGraphs(d).unavailable(1) is None
    static_tokens, static_logits = _greedy_steps(model, prompt, steps, run_step=True)
    eager_tokens, eager_logits = _greedy_steps(model, prompt, steps, run_step=None)
    for a, b in zip(static_logits, eager_logits):
        assert torch.equal(a, b)
    # and the plain CPU decode (exact-length keys, experts one by one) to rounding
    plain = offload.load(tmp_path, device="cpu")
    plain_tokens, plain_logits = _greedy_steps(plain, prompt, steps, run_step=None, bucketed=False)
    assert static_tokens == eager_tokens == plain_tokens
    for a, b in zip(static_logits, plain_logits):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5)


@pytest.mark.parametrize("arch", ["mimo_v2_flash", "gpt_oss", "qwen3_moe"])
def test_static_verify_step_equals_eager(arch, tmp_path, grouped_on_cpu):
    """A speculative verify step as a graph captures it (3 tokens per row over static buffers) writes and
    reads the cache as the eager pass does, bit for bit, with drafts rolled back between steps."""
    save_tiny(arch, tmp_path)
    model = offload.load(tmp_path, device="cpu")
    d = model.decoder
    d.experts = ResidentExperts(dict(d.experts.experts), stack=True)
    assert DecodeGraphs(d).unavailable(1, tokens=3) is None
    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(3, 100, (1, 5), generator=gen)
    caches = [KVCache([layer.attention for layer in d.spec.layers], 1, 64, d.dtype, d.device, slack=3,
                      preallocate=True, bucketed=True) for _ in range(2)]
    ones = torch.ones_like(prompt, dtype=torch.bool)
    hidden = [d.hidden_states(prompt, c, torch.arange(5)[None], ones) for c in caches]
    static = StaticStep(d, 1, 3)
    for _ in range(12):  # lengths 5..~30: buckets 8, 16 and 32, and back across one by a roll-back
        token = d.logits(hidden[0][:, -1]).argmax(-1, keepdim=True)
        step = torch.cat((token, torch.randint(3, 100, (1, 2), generator=gen)), 1)
        start = caches[0].length
        pos, valid = torch.arange(start, start + 3)[None], torch.ones(1, 3, dtype=torch.bool)
        static.load(step, caches[0], pos, valid)
        hidden = [static.run(caches[0]), d.hidden_states(step, caches[1], pos, valid)]
        caches[0].length += 3
        assert torch.equal(*hidden)
        keep = start + 1 + int(torch.randint(0, 3, (1,), generator=gen))  # the token and 0-2 drafts accepted
        for c in caches:
            c.truncate(keep)
        hidden = [h[:, :keep - start] for h in hidden]


@pytest.mark.parametrize("tokens,top_k", [(1, 1), (1, 2), (3, 2)])
@pytest.mark.parametrize("activation,biases", [("swiglu", False), ("swiglu_clamp", True)])
def test_moe_on_device_equals_grouped_moe(tokens, top_k, activation, biases, grouped_on_cpu):
    """Routing without the host (experts gathered by id) = the grouped path over experts handed out one by
    one, bit for bit: one pair (padded batch), several tokens, gpt-oss's biases and clamped activation."""
    g = torch.Generator().manual_seed(tokens * 10 + top_k)
    experts = {}
    for e in range(5):
        experts[0, e] = {"gate": torch.randn(24, 16, generator=g), "up": torch.randn(24, 16, generator=g),
                         "down": torch.randn(16, 24, generator=g)}
        if biases:
            experts[0, e] |= {f"{n}_bias": torch.randn(16 if n == "down" else 24, generator=g)
                              for n in ("gate", "up", "down")}
    spec = ExpertSpec(24, activation=activation, alpha=1.702, limit=7.0)
    router = RouterSpec(num_experts=5, top_k=top_k, scoring="softmax", renormalize=True)
    x = torch.randn(1, tokens, 16, generator=g)
    ids = torch.stack([torch.randperm(5, generator=g)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=g)
    provider = ResidentExperts({k: dict(w) for k, w in experts.items()}, stack=True)
    on_device = moe_on_device(x, weights, ids, provider.stacked(0), spec)
    class AllAtOnce:  # the provider protocol and nothing else: moe takes the grouped path (GROUPED_MAX_BYTES)
        def provide(self, layer, hit, w, t, prefetch):
            yield [(e, experts[0, e]) for e in hit]

    grouped = moe(x, 0, weights, ids, router, spec, AllAtOnce(), [], 0)
    assert torch.equal(on_device, grouped)
    assert torch.equal(moe(x, 0, weights, ids, router, spec, provider, [], 0), grouped)  # moe takes it itself


def test_stacked_experts_share_memory():
    g = torch.Generator().manual_seed(0)
    experts = {(layer, e): {"gate": torch.randn(8, 4, generator=g), "down": torch.randn(4, 8, generator=g)}
               for layer in (1, 3) for e in range(3)}
    experts[3, 1]["gate"] = experts[3, 1]["gate"].half()  # a layer whose experts differ is left as it is
    provider = ResidentExperts({k: dict(w) for k, w in experts.items()}, stack=True)
    stacks = provider.stacked(1)
    assert stacks["gate"].shape == (3, 8, 4) and provider.stacked(3) is None
    for e in range(3):
        assert torch.equal(provider.experts[1, e]["gate"], experts[1, e]["gate"])
        assert provider.experts[1, e]["gate"].data_ptr() == stacks["gate"][e].data_ptr()  # a view, no copy


def test_graphs_say_why_they_cannot_run(tmp_path, grouped_on_cpu, monkeypatch):
    save_tiny("olmoe", tmp_path)
    neither = "neither stacked on the device nor in device slots"
    output_prefetch = offload.load(tmp_path, device="cpu", cache_experts=2, prefetch=1, predict_from="output")
    assert "hook" in DecodeGraphs(output_prefetch.decoder).unavailable(1)
    aliased = offload.load(tmp_path, device="cpu", cache_experts=2, prefetch=1)  # a CPU's slots are host blobs
    assert neither in DecodeGraphs(aliased.decoder).unavailable(1)
    own_slots = _graphed(tmp_path, monkeypatch, cache_experts=2, prefetch=1).decoder.graphs
    assert own_slots.unavailable(1) is None  # a step's 2 experts fit in 2 slots, a verify step's 6 do not
    assert neither in own_slots.unavailable(1, tokens=3)
    on_host = _graphed(tmp_path, monkeypatch, cache_experts=2, miss_policy="cpu").decoder.graphs
    assert neither in on_host.unavailable(1)
    save_tiny("olmoe", tmp_path / "q", intermediate_size=64)  # sizes the 4-bit groups divide
    quantized = _graphed(tmp_path / "q", monkeypatch, cache_experts=2, quant="a4e4").decoder.graphs
    assert neither in quantized.unavailable(1)
    resident = offload.load(tmp_path, device="cpu")
    assert resident.decoder.graphs is None  # CPU: decoded eagerly
    assert neither in DecodeGraphs(resident.decoder).unavailable(1)  # not stacked on the CPU
    traced = _graphed(tmp_path, monkeypatch, record_trace=tmp_path / "trace.bin").decoder.graphs
    assert "every MoE layer must be offloaded" in traced.unavailable(1)  # hooks run only between pieces
    with pytest.raises(ValueError, match="cuda_graphs"):
        offload.load(tmp_path, device="cpu", cuda_graphs="yes")


def test_bucket():
    assert [bucket(n) for n in (1, 256, 257, 600, 4096, 4097)] == [256, 256, 512, 1024, 4096, 8192]


def test_sliding_window_model_replays(grouped_on_cpu, monkeypatch):
    """The demo's sliding-window ring caches under the runner: a graph's warm-up and check run a step twice,
    which must not leave its keys in the ring twice (the replay check then fails and graphs turn off)."""
    plain = offload.load("demo", device="cpu")
    prompt = plain.prompt_ids([{"role": "user", "content": "Sort 42, 7, 19, 88"}])
    expected = plain.generate(prompt, max_new_tokens=20, eos_token_ids=[])
    model = _graphed("demo", monkeypatch)
    assert torch.equal(model.generate(prompt, max_new_tokens=20, eos_token_ids=[]), expected)
    assert model.stats()["cuda_graphs"]["off"] is None and model.decoder.graphs.captured >= 2


def test_speculative_verify_steps_replay(tmp_path, grouped_on_cpu, monkeypatch):
    """MTP speculation on the graph runner: verify steps of each draft length get their own graphs, rolled-back
    drafts and all, and the tokens are plain greedy decoding's."""
    from offload.demo import tasks

    plain = offload.load("demo", device="cpu")
    prompts = [plain.prompt_ids([{"role": "user", "content": q}]) for _, q, _ in tasks.heldout(4)]
    expected = [plain.generate(p, max_new_tokens=24, eos_token_ids=[]) for p in prompts]
    model = _graphed("demo", monkeypatch)
    got = [model.generate(p, max_new_tokens=24, eos_token_ids=[], speculative="mtp", draft_tokens=3)
           for p in prompts]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    graphs = model.decoder.graphs
    lengths = {tokens for _, tokens, _ in graphs.graphs}
    assert len(lengths) >= 2 and max(lengths) > 1, graphs.graphs  # plain-length and verify steps
    assert graphs.leased == set() and model.stats()["speculative"]["accepted"] > 0


class Rerun:
    """torch.cuda.CUDAGraph's contract on the CPU, for piece j of a step: `replay` redoes the captured work
    into the same output tensors, reading whatever the static buffers, slot tables, the previous piece's
    outputs and the cache hold at that moment."""

    def __init__(self, step: StaticStep, cache: KVCache, j: int, before: dict, broken: bool = False) -> None:
        self.step, self.cache, self.j, self.before, self.broken = step, cache, j, before, broken
        self.out = step.piece(j, cache, before)

    def replay(self) -> None:
        for name, t in self.step.piece(self.j, self.cache, self.before).items():
            self.out[name].copy_(t * 0 if self.broken and name == "hidden" else t)


def _save(directory):
    save_tiny("olmoe", directory)
    return directory


def _graphed(directory, monkeypatch, broken: bool = False, fail: bool = False, **load):
    """The model in `directory` with a decoder that replays Rerun graphs (or fails to capture): experts
    resident and stacked, or with `cache_experts` in `load`, offloaded into slots of their own (not the host
    blobs a CPU's slots otherwise are), as on a GPU."""
    placement = load.pop("placement", "inclusive")
    model = offload.load(directory, device="cpu", **load)  # inclusive: its engine leaves the store whole
    d = model.decoder
    if isinstance(d.experts, ResidentExperts):
        d.experts = ResidentExperts(dict(d.experts.experts), stack=True)
    else:
        e = d.experts
        d.experts = OffloadedExperts(e.store, d.spec.moe_layers, load["cache_experts"], d.device, e.policy,
                                     e.miss_policy, placement, d.spec.router.top_k)
    d.graphs = DecodeGraphs(d)

    def capture(self, step, cache):
        if fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        graphs = []
        for j in range(step.pieces()):
            graphs.append(Rerun(step, cache, j, graphs[-1].out if graphs else {}, broken))
        self.captured += len(graphs)
        return graphs, [g.out for g in graphs]

    monkeypatch.setattr(DecodeGraphs, "_capture", capture)
    return model


def test_runner_replays_per_bucket_and_reuses_its_cache(tmp_path, grouped_on_cpu, monkeypatch):
    """The runner's bookkeeping with graphs that replay as CUDA graphs do: one graph per key bucket, the same
    tokens as eager decoding, and a second generation on the reused cache captures nothing new."""
    prompt = torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(2))
    expected = offload.load(_save(tmp_path), device="cpu").generate(prompt, max_new_tokens=24, eos_token_ids=[])
    model = _graphed(tmp_path, monkeypatch)
    assert torch.equal(model.generate(prompt, max_new_tokens=24, eos_token_ids=[]), expected)
    graphs = model.decoder.graphs
    assert sorted(graphs.graphs) == [(1, 1, 8), (1, 1, 16), (1, 1, 32)] and graphs.captured == 3  # positions 6..29
    cache = graphs.caches[1]
    assert torch.equal(model.generate(prompt, max_new_tokens=24, eos_token_ids=[]), expected)
    assert graphs.captured == 3 and graphs.caches[1] is cache and graphs.leased == set()
    assert model.stats()["cuda_graphs"] == {"captured": 3, "off": None}


@pytest.mark.parametrize("fault", ["capture fails", "replay differs"])
def test_a_bad_graph_falls_back_to_eager(fault, tmp_path, grouped_on_cpu):
    """A capture that raises, or a replay that gives other numbers than the eager step, turns graphs off for
    the model with a warning; the generation goes on eagerly with the right tokens, later ones too."""
    prompt = torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(2))
    expected = offload.load(_save(tmp_path), device="cpu").generate(prompt, max_new_tokens=12, eos_token_ids=[])
    with pytest.MonkeyPatch.context() as monkeypatch:
        model = _graphed(tmp_path, monkeypatch, broken=fault == "replay differs", fail=fault == "capture fails")
        why = "not permitted" if fault == "capture fails" else "differed from the eager step"
        with pytest.warns(UserWarning, match=f"CUDA graphs are off .*{why}"):
            got = model.generate(prompt, max_new_tokens=12, eos_token_ids=[])
        assert torch.equal(got, expected)
        graphs = model.decoder.graphs
        assert graphs.leased == set() and graphs.caches[1] is not None and not graphs.graphs
        assert why in model.stats()["cuda_graphs"]["off"]
        assert graphs.lease(1, 20) is None
        assert torch.equal(model.generate(prompt, max_new_tokens=12, eos_token_ids=[]), expected)


def _hidden_steps(model, prompt: torch.Tensor, steps: int, cache: KVCache) -> list[torch.Tensor]:
    """Greedy decoding through Decoder.step_hidden on `cache`: every step's final hidden states."""
    d = model.decoder
    hidden = d.hidden_states(prompt, cache, torch.arange(prompt.shape[1])[None], torch.ones_like(prompt).bool())
    out = []
    with d.experts.call():
        for _ in range(steps):
            token = d.logits(hidden[:, -1]).argmax(-1, keepdim=True)
            hidden = d.step_hidden(token, cache, torch.tensor([[cache.length]]), torch.ones(1, 1, dtype=torch.bool))
            out.append(hidden)
    return out


@pytest.mark.parametrize("placement", ["inclusive", "exclusive"])
@pytest.mark.parametrize("arch", ["mimo_v2_flash", "gpt_oss", "qwen3_moe"])
def test_offloaded_steps_replay_in_pieces(arch, placement, tmp_path, grouped_on_cpu, monkeypatch):
    """Offloaded experts on the graph runner: a step is one piece per MoE layer plus one, the host putting each
    layer's experts in slots between pieces (prefetching the next layer's), the pieces gathering them by slot.
    Every step's hidden states and the engine's counters (hits, misses, bytes copied, prefetches) are the
    eager offloaded decode's, bit for bit and count for count."""
    save_tiny(arch, tmp_path)
    load = dict(cache_experts=2, prefetch=1, placement=placement)
    prompt = torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(4))
    graphed = _graphed(tmp_path, monkeypatch, **load)
    eager = _graphed(tmp_path, monkeypatch, **load)
    eager.decoder.graphs = None
    d = graphed.decoder
    assert len(d.hooks) == 1 and d.graphs.unavailable(1) is None
    cache = d.decode_cache(1, 40)
    assert d.graphs.owns(cache)
    bucketed = KVCache([layer.attention for layer in d.spec.layers], 1, 40, d.dtype, d.device, preallocate=True,
                       bucketed=True)
    replayed, expected = _hidden_steps(graphed, prompt, 24, cache), _hidden_steps(eager, prompt, 24, bucketed)
    assert all(torch.equal(a, b) for a, b in zip(replayed, expected))
    assert d.graphs.failed is None and sorted(d.graphs.graphs) == [(1, 1, 8), (1, 1, 16), (1, 1, 32)]
    assert d.graphs.captured == 3 * (len(d.spec.moe_layers) + 1)
    stats, want = ({k: v for k, v in m.decoder.experts.stats().items() if not k.endswith("seconds")}
                   for m in (graphed, eager))
    assert stats == want and stats["misses"] > 0 and stats["prefetch_issued"] > 0, stats


def test_offloaded_speculation_replays_in_pieces(grouped_on_cpu, monkeypatch):
    """The demo offloaded with half its experts cached, MTP speculation and the learned prefetch predictor on
    the graph runner: plain and verify steps replay in pieces, and the tokens are plain greedy decoding's."""
    from offload.demo import tasks

    plain = offload.load("demo", device="cpu")
    prompts = [plain.prompt_ids([{"role": "user", "content": q}]) for _, q, _ in tasks.heldout(3)]
    expected = [plain.generate(p, max_new_tokens=24, eos_token_ids=[]) for p in prompts]
    model = _graphed("demo", monkeypatch, cache_experts=8, prefetch=1)
    assert model.decoder.hooks[0].predictors  # the demo's learned predictor reads the previous token's state
    got = [model.generate(p, max_new_tokens=24, eos_token_ids=[], speculative="mtp", draft_tokens=3)
           for p in prompts]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    graphs = model.decoder.graphs
    assert graphs.failed is None and max(tokens for _, tokens, _ in graphs.graphs) > 1
    assert model.stats()["speculative"]["accepted"] > 0
