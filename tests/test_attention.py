"""The fused attention projection (q, k and v in one matrix) gives the same bits as one projection each, the path
quantized weights take, for every attention variant; prefill and decode steps. (Against transformers:
test_reference.py.)"""
import pytest
import torch

from offload.model.attention import Step, attention, fuse_qkv
from offload.model.kv_cache import LayerCache
from offload.model.rope import RotaryTable
from offload.spec import AttentionSpec, RopeSpec

VARIANTS = {
    "gqa": {},
    "full_norm_clip": dict(qk_norm="full", num_kv_heads=4, clip_qkv=0.5),
    "full_norm_gqa": dict(qk_norm="full"),
    "head_norm_bias": dict(qk_norm="head", qkv_bias=True, o_bias=True),
    "partial_rope_value_scale": dict(partial=0.5, value_scale=0.7),
    "window_sinks": dict(window=3, sinks=True),
}


def _weights(a: AttentionSpec, hidden: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    nq, nk, nv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim, a.num_kv_heads * a.v_head_dim
    w = {"q": torch.randn(nq, hidden, generator=g), "k": torch.randn(nk, hidden, generator=g),
         "v": torch.randn(nv, hidden, generator=g), "o": torch.randn(hidden, a.num_heads * a.v_head_dim, generator=g)}
    if a.qkv_bias:
        w |= {f"{n}_bias": torch.randn(w[n].shape[0], generator=g) for n in ("q", "k", "v")}
    if a.o_bias:
        w["o_bias"] = torch.randn(hidden, generator=g)
    if a.qk_norm != "none":
        w["q_norm"] = torch.rand(a.head_dim if a.qk_norm == "head" else nq, generator=g) + 0.5
        w["k_norm"] = torch.rand(a.head_dim if a.qk_norm == "head" else nk, generator=g) + 0.5
    if a.sinks:
        w["sinks"] = torch.randn(a.num_heads, generator=g)
    return w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fused_projection_changes_no_bit(variant, dtype):
    options = dict(VARIANTS[variant])
    rope = RopeSpec(theta=10000.0, head_dim=16, partial_factor=options.pop("partial", 1.0))
    a = AttentionSpec(**({"num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "v_head_dim": 16, "rope": rope}
                         | options))
    g = torch.Generator().manual_seed(0)
    w = {k: t.to(dtype) for k, t in _weights(a, 32, g).items()}
    fused = fuse_qkv(w, a)
    assert "qkv" in fused and "q" not in fused
    separate = {k: t for k, t in fused.items() if not k.startswith("qkv")} | {  # as quantized q, k, v are kept
        k: t for k, t in w.items() if k[0] in "qkv" and "norm" not in k}
    x = torch.randn(2, 9, 32, generator=g).to(dtype)
    table, outputs = RotaryTable(rope, "cpu"), []
    for weights in (separate, fused):
        cache, out = LayerCache(a, 2, 9, dtype, "cpu"), []
        for start, end in ((0, 5), (5, 6), (6, 7), (7, 9)):  # a prompt, then decode steps past the window
            index = torch.arange(start, end)
            step = Step(start, index, torch.ones(2, end - start, dtype=torch.bool),
                        {rope: table.cos_sin(index.expand(2, -1), dtype)})
            out.append(attention(x[:, start:end], weights, a, 1e-6, step, cache))
        outputs.append(torch.cat(out, 1))
    assert torch.equal(outputs[0], outputs[1])
