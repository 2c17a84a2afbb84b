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


def test_quantized_triton_offloaded_equals_resident(prompts):
    """a4e2 on the GPU runs the Triton kernels, resident and from slots; the tokens must agree."""
    resident = offload.load("demo", device=CUDA, quant="a4e2")
    model = offload.load("demo", device=CUDA, quant="a4e2", cache_experts=4, prefetch=1)
    assert _greedy(model, prompts) == _greedy(resident, prompts)
    assert model.stats()["misses"] > 0


def test_mtp_speculation_on_gpu_is_exact(resident, prompts):
    assert _greedy(resident, prompts, speculative="mtp", draft_tokens=3) == _greedy(resident, prompts)
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
