"""gpt-oss MXFP4 checkpoints: our decoder against transformers' own, logits against a dense model that
holds the dequantized weights."""
import json

import torch
from hf_tiny import make_hf_model
from safetensors.torch import load_file, save_file
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

import offload

FP4 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def pack_mxfp4(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., R, C] float -> blocks [..., R, C/32, 16] uint8 (low nibble = even element), E8M0 scales."""
    blocks = rows.reshape(*rows.shape[:-1], -1, 32)
    exponent = torch.ceil(torch.log2(blocks.abs().amax(-1).clamp(min=1e-30) / 6.0)).clamp(-127, 127)
    scaled = blocks / torch.exp2(exponent)[..., None]
    code = (scaled.abs()[..., None] - FP4).abs().argmin(-1) | ((scaled < 0).long() << 3)
    packed = (code[..., 0::2] | (code[..., 1::2] << 4)).to(torch.uint8)
    return packed, (exponent + 127).to(torch.uint8)


def test_mxfp4_checkpoint(tmp_path):
    hf = make_hf_model("gpt_oss", seed=5)
    hf.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    dense = {}
    for name in list(state):
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = pack_mxfp4(state.pop(name).transpose(1, 2).contiguous())  # rows = [out, in]
            state[name + "_blocks"], state[name + "_scales"] = blocks, scales
            dense[name] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # transformers' decoder
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                                                                        "model.layers.*.mlp.router"]}
    (tmp_path / "config.json").write_text(json.dumps(config))

    model = offload.load(tmp_path)
    experts = model.decoder.experts.experts
    for name, full in dense.items():  # full: [E, in, out] as transformers' forward uses it
        layer = int(name.split(".")[2])
        for e in range(full.shape[0]):
            if name.endswith("gate_up_proj"):
                assert torch.equal(experts[layer, e]["gate"], full[e][:, 0::2].T)
                assert torch.equal(experts[layer, e]["up"], full[e][:, 1::2].T)
            else:
                assert torch.equal(experts[layer, e]["down"], full[e].T)

    with torch.no_grad():  # the reference: transformers' dense model holding the dequantized weights
        for name, full in dense.items():
            hf.get_parameter(name).copy_(full)
        ids = torch.randint(1, 256, (2, 40), generator=torch.Generator().manual_seed(0))
        expected = hf(ids).logits
    got = model.forward(ids)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_mxfp4_experts_stay_mxfp4_under_a_preset(tmp_path):
    test_mxfp4_checkpoint(tmp_path)  # writes the MXFP4 checkpoint (and checks it)
    resident = offload.load(tmp_path, quant="a4e4")
    offloaded = offload.load(tmp_path, quant="a4e4", cache_experts=2)
    view = offloaded.decoder.experts.store.view(offloaded.decoder.experts.store.blobs[0, 0])
    assert {view[m].fmt for m in ("gate", "up", "down")} == {"mxfp4"}
    ids = torch.randint(1, 256, (1, 12), generator=torch.Generator().manual_seed(3))
    assert torch.equal(resident.generate(ids, max_new_tokens=6), offloaded.generate(ids, max_new_tokens=6))
