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
