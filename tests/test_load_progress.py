"""offload.load reports the progress of its slow stage (offload-chat draws it): every checkpoint tensor read (and
quantized as it is read), once each, in order, ending at done == total."""
from hf_tiny import save_tiny
from safetensors import safe_open

import offload


def test_quantizing_load_reports_every_tensor(tmp_path):
    save_tiny("qwen3_moe", tmp_path, moe_intermediate_size=64)
    calls = []
    model = offload.load(tmp_path, quant="a4e4", progress=lambda *call: calls.append(call))
    by_stage = {}
    for stage, done, total in calls:
        by_stage.setdefault(stage, []).append((done, total))
    assert list(by_stage) == ["reading and quantizing (a4e4)"]
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        tensors = len(f.keys())
    reports = by_stage["reading and quantizing (a4e4)"]
    assert reports == [(done, tensors) for done in range(tensors + 1)]
