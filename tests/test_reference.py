"""Our runtime against transformers 5.23 on tiny perturbed checkpoints of every architecture."""
import pytest
import torch

import offload


def _ids(n: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 256, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=["one_file", "sharded"])
def checkpoint(request, tiny):
    """`tiny`, and the same model saved in small shards that split its experts (conftest.tiny_sharded)."""
    return tiny if request.param == "one_file" else request.getfixturevalue("tiny_sharded")


def test_prefill_logits_match_transformers(checkpoint):
    arch, path, ref = checkpoint
    ids = _ids(40)
    expected = ref(ids).logits
    got = offload.load(path).forward(ids)
    err = (got - expected).abs().max() / expected.abs().max()
    assert err <= 1e-4, f"{arch}: relative max|dlogits| {err:.2e}"


def test_greedy_generation_matches_transformers(checkpoint):
    arch, path, ref = checkpoint
    ids = _ids(12, batch=1, seed=2)
    expected = ref.generate(ids, max_new_tokens=32, do_sample=False, min_new_tokens=32)
    got = offload.load(path).generate(ids, max_new_tokens=32)
    assert got.tolist() == expected.tolist(), arch


def test_incremental_decode_equals_full_forward(tiny):
    """Prefill a few tokens, then feed the rest one by one (crossing every sliding window)."""
    arch, path, _ = tiny
    model = offload.load(path)
    ids = _ids(40)
    full = model.forward(ids)
    decoder = model.decoder
    cache = decoder.new_cache(2, 40)
    valid = torch.ones(2, 40, dtype=torch.bool)
    positions = torch.arange(40).expand(2, 40)
    steps = [decoder.logits(decoder.hidden_states(ids[:, :5], cache, positions[:, :5], valid[:, :5]))]
    for t in range(5, 40):
        steps.append(decoder.logits(decoder.hidden_states(ids[:, t:t + 1], cache, positions[:, t:t + 1],
                                                          valid[:, t:t + 1])))
    inc = torch.cat(steps, dim=1)
    assert (inc - full).abs().max() <= 1e-4 * full.abs().max(), arch
