"""Sliding-window layers keep a ring of exactly `window` entries: memory constant in sequence length."""
import pytest
import torch
from hf_tiny import save_tiny

import offload


@pytest.mark.parametrize("arch", ["mimo_v2_flash", "gpt_oss"])
def test_ring_buffer_stays_window_sized_and_exact(arch, tmp_path):
    ref = save_tiny(arch, tmp_path)
    model = offload.load(tmp_path)
    window = ref.config.sliding_window
    prefill, steps = 5, 4 * window
    total = prefill + steps
    ids = torch.randint(1, 256, (1, total), generator=torch.Generator().manual_seed(3))
    decoder = model.decoder
    cache = decoder.new_cache(1, total)
    swa = [i for i, layer in enumerate(model.spec.layers) if layer.attention.window]
    full = [i for i in range(len(model.spec.layers)) if i not in swa]
    assert swa and full
    before = {i: (cache.layers[i].k.data_ptr(), cache.layers[i].k.shape) for i in swa}
    positions = torch.arange(total)[None]
    valid = torch.ones(1, total, dtype=torch.bool)
    logits = [decoder.logits(decoder.hidden_states(ids[:, :prefill], cache, positions[:, :prefill],
                                                   valid[:, :prefill]))]
    for t in range(prefill, total):
        logits.append(decoder.logits(decoder.hidden_states(ids[:, t:t + 1], cache, positions[:, t:t + 1],
                                                           valid[:, t:t + 1])))
    for i in swa:
        assert cache.layers[i].k.shape[2] == window  # a ring of exactly `window` positions
        assert (cache.layers[i].k.data_ptr(), cache.layers[i].k.shape) == before[i]  # never reallocated
    for i in full:
        assert cache.layers[i].k.shape[2] == total
    with torch.no_grad():
        expected = ref(ids).logits
    got = torch.cat(logits, dim=1)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_sliding_layers_memory_is_constant_in_length(tmp_path):
    save_tiny("mimo_v2_flash", tmp_path)
    decoder = offload.load(tmp_path).decoder
    swa = [i for i, layer in enumerate(decoder.spec.layers) if layer.attention.window]

    def swa_bytes(max_len: int) -> int:
        cache = decoder.new_cache(1, max_len)
        return sum(cache.layers[i].k.nbytes + cache.layers[i].v.nbytes for i in swa)

    assert swa_bytes(64) == swa_bytes(4096)
    full = next(i for i in range(len(decoder.spec.layers)) if i not in swa)
    assert decoder.new_cache(1, 4096).layers[full].capacity < decoder.new_cache(1, 4096 * 2).layers[full].capacity
