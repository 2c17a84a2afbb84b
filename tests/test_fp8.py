"""Block-scaled FP8 checkpoints (float8_e4m3fn weights + weight_scale_inv per 128x128 block, as DeepSeek-V3,
Kimi-K2 and MiMo-V2-Flash publish them) load as their dequantized values, then take any preset."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import offload
from offload.packed import convert
from hf_tiny import save_tiny


def to_fp8_blocks(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = w.shape
    rows, cols = -(-n // block), -(-k // block)
    scale = torch.empty(rows, cols)
    q = torch.empty(n, k, dtype=torch.float8_e4m3fn)
    for i in range(rows):
        for j in range(cols):
            tile = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            scale[i, j] = tile.abs().max().clamp(min=1e-12) / 448.0
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (tile / scale[i, j]).to(torch.float8_e4m3fn)
    return q, scale


@pytest.mark.parametrize("arch", ["mimo_v2_flash", "deepseek_v3"])
def test_fp8_checkpoint_loads_dequantized(tmp_path, arch):
    """Loaded and offload-convert'ed alike (every architecture reads weights through one loader)."""
    sizes = {"q_lora_rank": 64} if arch == "deepseek_v3" else {}  # divisible by the a4e4 group size
    save_tiny(arch, tmp_path / "dense", hidden_size=128, moe_intermediate_size=192, intermediate_size=192,
              **sizes)  # 192: a partial 128-block at the edge, and divisible by the group size
    state = load_file(tmp_path / "dense" / "model.safetensors")
    fp8, reference = {}, {}
    for name, w in state.items():
        if w.dim() == 2 and name.endswith("proj.weight") and "layers." in name:
            q, s = to_fp8_blocks(w)
            fp8[name], fp8[name + "_scale_inv"] = q, s
            reference[name] = q.float() * s.repeat_interleave(128, 0)[: w.shape[0]].repeat_interleave(128, 1)[
                :, : w.shape[1]]
        else:
            fp8[name] = reference[name] = w
    (tmp_path / "fp8").mkdir()
    (tmp_path / "ref").mkdir()
    save_file(fp8, tmp_path / "fp8" / "model.safetensors", metadata={"format": "pt"})
    save_file(reference, tmp_path / "ref" / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    (tmp_path / "ref" / "config.json").write_text(json.dumps(config))
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128], "fmt": "e4m3"}
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(config))

    ids = torch.randint(1, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    expected = offload.load(tmp_path / "ref").forward(ids)
    assert torch.equal(offload.load(tmp_path / "fp8").forward(ids), expected)
    assert torch.equal(offload.load(convert(tmp_path / "fp8", tmp_path / "packed")).forward(ids), expected)
    assert not torch.equal(expected, offload.load(tmp_path / "dense").forward(ids))  # fp8 really rounded
    quantized = offload.load(tmp_path / "fp8", quant="a4e4", cache_experts=2)
    assert torch.isfinite(quantized.forward(ids)).all()
