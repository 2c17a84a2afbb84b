"""offload.load reports the progress of its slow stages (offload-chat draws it): every checkpoint tensor
read, then every quantized matrix, once each, in order, each stage ending at done == total."""
from hf_tiny import save_tiny
from safetensors import safe_open

import offload


def test_quantizing_load_reports_every_tensor_and_matrix(tmp_path):
    save_tiny("qwen3_moe", tmp_path, moe_intermediate_size=64)
    calls = []
    model = offload.load(tmp_path, quant="a4e4", progress=lambda *call: calls.append(call))
    by_stage = {}
    for stage, done, total in calls:
        by_stage.setdefault(stage, []).append((done, total))
    assert list(by_stage) == ["reading weights", "quantizing (a4e4)"]
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        tensors = len(f.keys())
    spec = model.spec
    layers, moe = len(spec.layers), len(spec.moe_layers)
    matrices = 4 * layers + 3 * (layers - moe) + 3 * moe * spec.router.num_experts  # attention, dense MLPs, experts
    for stage, expected in (("reading weights", tensors), ("quantizing (a4e4)", matrices)):
        total = by_stage[stage][0][1]
        assert total == expected, stage
        assert by_stage[stage] == [(done, total) for done in range(total + 1)], stage
