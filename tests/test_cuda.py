"""The CUDA path on a real GPU: pinned host tier, copy streams and events, Triton kernels inside the model.

CPU machines (CI) skip this module: its subject is the CUDA-specific layer, whose logic the CPU tests already
exercise through the thread copier. On a GPU machine: `TRITON_INTERPRET=0 python -m pytest tests/test_cuda.py`.
"""
import pytest
import torch

import offload

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def prompts():
    model = offload.load("demo", device="cpu")
    from offload.demo import tasks

    return [model.prompt_ids([{"role": "user", "content": q}]) for _, q, _ in tasks.heldout(6)]


@pytest.fixture(scope="module")
def resident():
    return offload.load("demo", device=CUDA)


def _greedy(model, prompts, **kw):
    return [model.generate(p, max_new_tokens=32, **kw).tolist() for p in prompts]


@pytest.mark.parametrize("placement,miss_policy,prefetch", [
    ("inclusive", "load", 1), ("inclusive", "load", 0), ("exclusive", "load", 1), ("inclusive", "cpu", 1),
    ("split", "cpu", 0)])  # the split computes its cold experts on the CPU whatever miss_policy says
def test_offloaded_on_gpu_equals_resident(resident, prompts, placement, miss_policy, prefetch):
    model = offload.load("demo", device=CUDA, cache_experts=4, prefetch=prefetch, placement=placement,
                         miss_policy=miss_policy)
    blob = next(iter(model.decoder.experts.store.blobs.values()))
    assert blob.is_pinned(), "the host tier should be pinned on CUDA"
    shortest = min(p.shape[1] for p in prompts)
    ids = torch.cat([p[:, :shortest] for p in prompts]).to(CUDA)
    # a miss computed on the host runs the CPU's matmul, not the GPU's: equal up to rounding
    torch.testing.assert_close(model.forward(ids), resident.forward(ids), rtol=0,
                               atol=1e-4 if miss_policy == "cpu" else 1e-6)
    assert _greedy(model, prompts) == _greedy(resident, prompts)
    stats = model.stats()
    assert stats["hits"] > 0 and stats["misses"] > 0, stats
    if prefetch:
        assert stats["prefetch_used"] > 0, stats
    if miss_policy == "cpu":
        assert stats["cpu_computed"] > 0, stats
    else:  # experts copied into slots: decode steps replay in pieces, one graph per MoE layer plus one
        assert stats["cuda_graphs"]["off"] is None and stats["cuda_graphs"]["captured"] > 0, stats


def test_cuda_graph_decode_equals_eager(resident, prompts):
    """Resident 16-bit decode replays CUDA graphs (one per key bucket); the tokens and every step's logits
    are the eager decode's bit for bit, across a bucket boundary, call after call on the reused cache, and
    with a second generation interleaved (it decodes eagerly on a cache of its own)."""
    eager = offload.load("demo", device=CUDA, cuda_graphs=False)
    assert resident.decoder.graphs.unavailable(1) is None
    long = torch.cat([prompts[0]] * 40, 1)[:, :250]  # 250 + 32 tokens cross the 256-key bucket
    for p in (*prompts, long):
        assert resident.generate(p, max_new_tokens=32).tolist() == eager.generate(p, max_new_tokens=32).tolist()
    assert resident.decoder.graphs.captured >= 2
    d, e = resident.decoder, eager.decoder
    caches = [m.decode_cache(1, long.shape[1] + 8) for m in (d, e)]
    assert d.graphs.owns(caches[0]) and e.graphs is None
    ones = torch.ones(1, long.shape[1], dtype=torch.bool, device=CUDA)
    pos = torch.arange(long.shape[1], device=CUDA)[None]
    tokens = long.to(CUDA)
    for _ in range(8):  # prefill, then one-token steps: replayed on d, eager on e
        a, b = (m.next_logits(tokens, c, pos, ones) for m, c in zip((d, e), caches))
        assert torch.equal(a, b)
        tokens, pos, ones = a.argmax(-1)[:, None], pos[:, -1:] + 1, torch.ones(1, 1, dtype=torch.bool, device=CUDA)
    d.release(caches[0])
    questions = [[{"role": "user", "content": q}] for q in ("What is 12+30?", "Sort 5, 3, 9")]
    first, second = (resident.generate(q, max_new_tokens=16, stream=True) for q in questions)
    a, b = [next(first)], [next(second)]
    b += list(second)
    a += list(first)
    assert ["".join(a), "".join(b)] == [eager.generate(q, max_new_tokens=16) for q in questions]
    assert d.graphs.leased == set()


def test_quantized_triton_offloaded_equals_resident(prompts):
    """a4e2 on the GPU runs the Triton kernels, resident and from slots; the tokens must agree."""
    resident = offload.load("demo", device=CUDA, quant="a4e2")
    model = offload.load("demo", device=CUDA, quant="a4e2", cache_experts=4, prefetch=1)
    # logits first: a difference there says where (it failed on an H200 at bf4f5c3, cause not yet seen)
    shortest = min(p.shape[1] for p in prompts)
    ids = torch.cat([p[:, :shortest] for p in prompts]).to(CUDA)
    torch.testing.assert_close(model.forward(ids), resident.forward(ids), rtol=0, atol=0)
    for p, got, want in zip(prompts, _greedy(model, prompts), _greedy(resident, prompts)):
        assert got == want, f"prompt of {p.shape[1]} tokens: offloaded {got[0][p.shape[1]:]} != resident {want[0][p.shape[1]:]}"
    assert model.stats()["misses"] > 0


def test_mtp_speculation_on_gpu_is_exact(resident, prompts):
    assert _greedy(resident, prompts, speculative="mtp", draft_tokens=3) == _greedy(resident, prompts)
    graphs = resident.decoder.graphs
    assert graphs.failed is None and any(tokens > 1 for _, tokens, _ in graphs.graphs)  # verify steps replayed
    model = offload.load("demo", device=CUDA, cache_experts=4)
    assert _greedy(model, prompts, speculative="mtp", draft_tokens=2) == _greedy(resident, prompts)


def test_copy_stream_orders_slot_reuse():
    """Two loads into one slot, the first consumed by a kernel on the compute stream: the second copy must
    not overwrite the slot before that kernel has read it (the copier waits on the compute stream)."""
    from offload.engine.copier import CudaCopier

    copier = CudaCopier(CUDA)
    a, b = (torch.full((1 << 24,), v, dtype=torch.float32).pin_memory() for v in (1.0, 2.0))
    slot = torch.empty(1 << 24, device=CUDA)
    copier.wait(copier.submit(slot, a))
    big = torch.randn(4096, 4096, device=CUDA)
    for _ in range(20):  # keep the compute stream busy, so a racing copy would land first
        big = big @ big / 64
    first = slot.sum()
    copier.wait(copier.submit(slot, b))
    assert float(first) == float(1 << 24)
    assert float(slot.sum()) == 2.0 * (1 << 24)
