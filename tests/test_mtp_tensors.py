"""MiMo-V2-Flash MTP tensors (model.mtp.*) are loaded into the model; transformers ignores them."""
import torch
from hf_tiny import save_tiny
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import offload


def test_mtp_tensors_are_loaded(tmp_path):
    save_tiny("mimo_v2_flash", tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    mtp = {"model.mtp.layers.0.enorm.weight": torch.randn(64, generator=g),
           "model.mtp.layers.0.hnorm.weight": torch.randn(64, generator=g),
           "model.mtp.layers.0.eh_proj.weight": torch.randn(64, 128, generator=g),
           "model.mtp.layers.0.self_attn.q_proj.weight": torch.randn(96, 64, generator=g)}
    save_file(state | mtp, tmp_path / "model.safetensors", metadata={"format": "pt"})

    model = offload.load(tmp_path)
    assert set(model.mtp) == {name[len("model.mtp."):] for name in mtp}
    for name, tensor in mtp.items():
        assert torch.equal(model.mtp[name[len("model.mtp."):]], tensor)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path)  # loads, ignoring model.mtp.*
    ids = torch.randint(1, 256, (1, 20), generator=g)
    with torch.no_grad():
        expected = hf(ids).logits
    assert (model.forward(ids) - expected).abs().max() <= 1e-4 * expected.abs().max()
