"""The shipped demo checkpoint in our runtime: logits equal transformers', greedy MTP speculation and
offloading change no token."""
import pytest
import torch

import offload
from offload.checkpoint import DEMO_DIR
from offload.demo import tasks


@pytest.fixture(scope="module")
def demo():
    return offload.load("demo", device="cpu")


def test_logits_match_transformers(demo):
    from transformers import MiMoV2FlashForCausalLM

    ref = MiMoV2FlashForCausalLM.from_pretrained(DEMO_DIR, dtype=torch.float32).eval()
    ids = demo.prompt_ids([{"role": "user", "content": q} for _, q, _ in tasks.heldout(1)])
    with torch.no_grad():
        expected = ref(ids).logits
    assert (demo.forward(ids) - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_greedy_mtp_and_offloading_change_nothing(demo):
    offloaded = offload.load("demo", device="cpu", cache_experts=4)
    for _, question, _ in tasks.heldout(5):
        ids = demo.prompt_ids([{"role": "user", "content": question}])
        plain = demo.generate(ids, max_new_tokens=40)
        assert torch.equal(demo.generate(ids, max_new_tokens=40, speculative="mtp", draft_tokens=3), plain)
        assert torch.equal(offloaded.generate(ids, max_new_tokens=40, speculative="mtp", draft_tokens=2), plain)
    assert demo.stats()["speculative"]["first_draft_acceptance"] > 0.5
