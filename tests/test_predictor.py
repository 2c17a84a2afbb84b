"""Learned prefetch predictors: the fit, the file, and that the shipped ones predict better than the plain
router on held-out prompts without changing any output."""
import pytest
import torch

import offload
from offload.engine.prefetch import Prefetcher
from offload.errors import CheckpointError
from offload.model import predictor


def test_fit_recovers_an_affine_map():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(33, 16, generator=g)
    early, previous = torch.randn(500, 16, generator=g), torch.randn(500, 16, generator=g)
    target = predictor.apply(a, early, previous)
    torch.testing.assert_close(predictor.fit(torch.cat((early, previous), 1), target, ridge=0.0), a,
                               rtol=1e-4, atol=1e-4)


def test_save_load_round_trip(tmp_path):
    maps = {2: torch.randn(17, 8), 5: torch.randn(17, 8)}
    predictor.save(maps, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [predictor.FILENAME]  # no temporary file left behind
    loaded = predictor.load(tmp_path, 8, torch.device("cpu"))
    assert loaded.keys() == maps.keys() and all(torch.equal(loaded[j], maps[j]) for j in maps)
    assert predictor.load(tmp_path / "missing", 8, torch.device("cpu")) == {}


def test_a_map_of_another_shape_is_refused_with_the_fix(tmp_path):
    predictor.save({2: torch.randn(9, 8)}, tmp_path)  # one input block only: an older or foreign file
    with pytest.raises(CheckpointError, match=r"layer 2's map is \(9, 8\), not \(17, 8\).*calibrate_predictor"):
        predictor.load(tmp_path, 8, torch.device("cpu"))


def test_shipped_predictors_raise_recall_and_change_no_token():
    from offload.demo import tasks

    with_pred = offload.load("demo", cache_experts=4, prefetch=1)
    plain = offload.load("demo", cache_experts=4, prefetch=1)
    assert _prefetcher(with_pred).predictors, "the demo ships predictor.safetensors"
    _prefetcher(plain).predictors = {}
    resident = offload.load("demo")
    for _, q, _ in tasks.heldout(12):
        ids = resident.prompt_ids([{"role": "user", "content": q}])
        out = resident.generate(ids, max_new_tokens=24)
        assert torch.equal(with_pred.generate(ids, max_new_tokens=24), out)
        plain.generate(ids, max_new_tokens=24)
    assert with_pred.stats()["prediction_recall"] > plain.stats()["prediction_recall"] + 0.01


def test_the_kept_router_input_does_not_pin_the_prompt():
    """The predictors read each MoE layer's router input at the previous token; after a prefill that must be
    one row, not a view that keeps the whole prompt's activations alive (a 4k-token prompt on a large model:
    ~32 MB a layer)."""
    model = offload.load("demo", cache_experts=4, prefetch=1)
    decoder, ids = model.decoder, torch.randint(3, 400, (1, 30))
    cache = decoder.new_cache(1, 40)
    decoder.hidden_states(ids, cache, torch.arange(30)[None], torch.ones_like(ids, dtype=torch.bool))
    assert sorted(cache.router_inputs) == decoder.spec.moe_layers
    row = decoder.spec.hidden_size * 4
    assert all(t.untyped_storage().nbytes() == row for t in cache.router_inputs.values())


def _prefetcher(model) -> Prefetcher:
    return next(hook for hook in model.decoder.hooks if isinstance(hook, Prefetcher))
