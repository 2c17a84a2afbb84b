"""Small models decode on one torch thread on a CPU; the caller's thread setting survives every call."""
import pytest
import torch

import offload
from offload.model.threads import SMALL_MATRIX_BYTES, threads_for


def test_only_small_cpu_models_pin_one_thread():
    small = torch.zeros(SMALL_MATRIX_BYTES // 4 // 256, 256)
    big = torch.zeros(SMALL_MATRIX_BYTES // 4 // 256 + 1, 256)
    assert threads_for([small, torch.zeros(256)], torch.device("cpu")) == 1
    assert threads_for([small, big], torch.device("cpu")) == 0
    assert threads_for([small], torch.device("cuda")) == 0
    model = offload.load("demo", device="cpu")
    assert model.decoder.threads == 1 and model.mtp_head.threads == 1


def test_the_callers_thread_count_is_restored(monkeypatch):
    model = offload.load("demo", device="cpu")
    original = torch.get_num_threads()
    torch.set_num_threads(2)
    embedding, seen = torch.nn.functional.embedding, []

    def watched(*args, **kwargs):  # every decoder and MTP call embeds first: note the thread count there
        seen.append(torch.get_num_threads())
        return embedding(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "embedding", watched)
    try:
        ids = model.prompt_ids("12+7=")
        model.generate(ids, max_new_tokens=4)
        model.generate(ids, max_new_tokens=4, speculative="mtp", draft_tokens=2)
        assert seen and set(seen) == {1} and torch.get_num_threads() == 2
        cache = model.decoder.new_cache(1, 2)
        with pytest.raises(ValueError, match="exceeds the KV cache"):  # an error inside a call restores it too
            model.decoder.hidden_states(ids, cache, torch.arange(ids.shape[1])[None],
                                        torch.ones_like(ids, dtype=torch.bool))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(original)
