"""Property tests of the expert engine driven directly: slot invariants, exact LRU order, slot bytes equal
host blobs, exclusive placement keeps every expert in exactly one place, injected copy faults."""
from collections import OrderedDict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import offload
from offload.engine.offloaded import OffloadedExperts
from offload.engine.store import HostStore
from offload.errors import OffloadError

LAYERS, EXPERTS = (0, 1), 6


@pytest.fixture(autouse=True)
def threaded_copies(monkeypatch):
    """These tests' experts are tiny, so the copier would copy them inline: make every copy go through the
    thread, whose ordering, overlap and faults are what they check."""
    monkeypatch.setattr("offload.engine.copier.INLINE_COPY_BYTES", 0)


def test_small_copies_run_inline_only_behind_nothing():
    from offload.engine.copier import ThreadCopier

    copier = ThreadCopier(inline_bytes=1 << 10)
    dst, small = torch.zeros(256), torch.ones(256)
    handle = copier.submit(dst, small)
    assert handle.done() and torch.equal(dst, small)  # idle lane: copied before submit returned
    big_dst, big = torch.zeros(1 << 24), torch.full((1 << 24,), 2.0)
    first = copier.submit(big_dst, big)  # threaded; a small copy into the same memory must wait behind it
    second = copier.submit(big_dst[:256], torch.full((256,), 3.0))
    copier.wait(first)
    copier.wait(second)
    assert bool((big_dst[:256] == 3.0).all()) and bool((big_dst[256:] == 2.0).all())
    copier.close()


def _experts(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {(layer, e): {"gate": torch.randn(8, 4, generator=g), "up": torch.randn(8, 4, generator=g),
                         "down": torch.randn(4, 8, generator=g)} for layer in LAYERS for e in range(EXPERTS)}


steps = st.lists(st.tuples(st.sampled_from(LAYERS), st.sets(st.integers(0, EXPERTS - 1), min_size=1, max_size=4),
                           st.lists(st.integers(0, EXPERTS - 1), max_size=3, unique=True)), min_size=1, max_size=25)


def _drive(engine: OffloadedExperts, originals: dict, layer: int, needed: set, predicted: list) -> None:
    """One MoE layer: consume every yielded batch; every expert of a batch is exact until the next batch is
    asked for (the MoE computes a whole batch at once)."""
    later = [(1, predicted)] if layer == 0 else []
    experts = sorted(needed)
    seen = []
    for batch in engine.provide(layer, experts, [1.0] * len(experts), [1] * len(experts), later):
        for e, w in batch:
            for name, t in originals[layer, e].items():
                assert torch.equal(w[name], t), (layer, e, name)
        seen += [e for e, _ in batch]
    assert sorted(seen) == experts


@settings(max_examples=40, deadline=None)
@given(capacity=st.integers(1, 4), trace=steps, exclusive=st.booleans())
def test_slot_invariants(capacity, trace, exclusive):
    originals = _experts()
    engine = OffloadedExperts(HostStore.pack(originals), list(LAYERS), capacity, torch.device("cpu"),
                              placement="exclusive" if exclusive else "inclusive")
    for layer, needed, predicted in trace:
        _drive(engine, originals, layer, needed, predicted)
        engine.sync()
        for lyr in LAYERS:
            slots = engine.slots[lyr]
            assert len(slots.slot_of) <= capacity
            assert len(set(slots.slot_of.values())) == len(slots.slot_of)  # one slot per resident
            for e, slot in slots.slot_of.items():  # every resident slot holds exactly its expert's bytes
                view = engine.store.view(engine.memory[lyr][slot])
                assert all(torch.equal(view[n], t) for n, t in originals[lyr, e].items())
            if exclusive:  # in exactly one place: a device slot or the host
                for e in range(EXPERTS):
                    assert (e in slots.slot_of) != ((lyr, e) in engine.store.blobs), (lyr, e)
        if len(needed) <= capacity:
            assert needed <= set(engine.slots[layer].slot_of)


@settings(max_examples=40, deadline=None)
@given(capacity=st.integers(1, 4), trace=steps)
def test_lru_order_is_exact(capacity, trace):
    """Without prefetch the residents follow an OrderedDict LRU reference exactly."""
    originals = _experts()
    engine = OffloadedExperts(HostStore.pack(originals), list(LAYERS), capacity, torch.device("cpu"))
    reference = {layer: OrderedDict() for layer in LAYERS}  # oldest first
    for layer, needed, _ in trace:
        _drive(engine, originals, layer, needed, [])
        lru, used = reference[layer], sorted(needed)
        hits = [e for e in used if e in lru]
        for e in hits:
            lru.move_to_end(e)
        missing, in_use = [e for e in used if e not in lru], set(used)
        while missing:  # load what fits; experts already consumed become evictable again
            batch = []
            while missing:
                if len(lru) >= capacity:
                    victims = [x for x in lru if x not in in_use]
                    if not victims:
                        break
                    lru.pop(victims[0])
                lru[missing[0]] = True
                batch.append(missing.pop(0))
            in_use -= set(hits + batch)
            hits = []
        assert list(engine.slots[layer].slot_of) and set(engine.slots[layer].slot_of) == set(lru)
        stamps = engine.slots[layer].policy._recency.stamp
        assert sorted(lru, key=lambda e: stamps[e]) == list(lru)  # the exact recency order


def test_copy_fault_is_clean_and_recoverable(tmp_path):
    from hf_tiny import save_tiny

    save_tiny("olmoe", tmp_path)
    resident = offload.load(tmp_path)
    model = offload.load(tmp_path, cache_experts=2)  # on a CPU its slots alias the host blobs: nothing to copy
    aliasing = model.decoder.experts
    engine = model.decoder.experts = OffloadedExperts(aliasing.store, list(aliasing.holds), 2, model.device)
    copy, calls = engine.copier._copy, {"n": 0}

    def failing(dst, src):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("injected DMA fault")
        copy(dst, src)

    engine.copier._copy = failing
    prompt = torch.randint(1, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    with pytest.raises(OffloadError, match="injected DMA fault"):
        model.generate(prompt, max_new_tokens=8)
    engine.copier._copy = copy
    engine.sync()
    for layer, slots in engine.slots.items():  # consistent: every resident slot holds its expert
        for e, slot in slots.slot_of.items():
            assert torch.equal(engine.memory[layer][slot], engine.store.blobs[layer, e])
    assert torch.equal(model.generate(prompt, max_new_tokens=8), resident.generate(prompt, max_new_tokens=8))


def test_exclusive_placement_end_to_end(tmp_path):
    """Host holds fewer than all experts; generation is identical to the resident model."""
    from hf_tiny import save_tiny

    save_tiny("qwen3_moe", tmp_path)
    resident = offload.load(tmp_path)
    model = offload.load(tmp_path, cache_experts=2, placement="exclusive")
    engine = model.decoder.experts
    total = len(model.spec.moe_layers) * model.spec.router.num_experts
    assert len(engine.store.blobs) == total - 2 * len(model.spec.moe_layers)
    prompt = torch.randint(1, 256, (1, 6), generator=torch.Generator().manual_seed(1))
    assert torch.equal(model.generate(prompt, max_new_tokens=16), resident.generate(prompt, max_new_tokens=16))
    engine.sync()
    assert len(engine.store.blobs) == total - 2 * len(model.spec.moe_layers)
