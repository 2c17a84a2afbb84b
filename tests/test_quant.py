"""Quantization formats: error vs hqq, sizes, metadata, blobs, NF4/MXFP4/FP8 references, bad input."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from one_line import raises_one_line
from offload.quant import (
    PRESETS,
    QuantizedTensor,
    dequantize_fp8_blocks,
    from_mxfp4,
    get_preset,
    hqq_reference,
    pack_expert,
    quantize,
    read_index,
    unpack_expert,
)
from offload.quant.imports import bitsandbytes_runs_here
from offload.quant.layout import pack_codes, unpack_codes
from offload.quant.meta import dequantize_meta, quantize_meta

from offload import OffloadError


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def weight() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(128, 256) * 0.02


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("group", [16, 32, 64, 128])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_hqq_error_matches_hqq(weight, bits, group, axis):
    qt = quantize(weight, bits, group, axis=axis)
    ours, ref = rel_err(qt.dequantize(torch.float32), weight), rel_err(hqq_reference(weight, bits, group, axis), weight)
    assert ours <= ref * 1.02 + 1e-6
    assert qt.shape == (128, 256) and qt.dequantize().dtype == torch.bfloat16


@pytest.mark.parametrize("name,role,shape", [("a4e2", "expert", (4096, 14336)), ("a4e3", "expert", (96, 128)),
                                             ("a4e4", "attention", (64, 128)), ("nf4", "expert", (64, 128))])
def test_bits_per_param_matches_stored_bytes(name, role, shape):
    spec = get_preset(name).spec(role)
    if shape[0] * shape[1] <= 1 << 16 and (name != "nf4" or bitsandbytes_runs_here()):  # else: the formula
        qt = spec.quantize(torch.randn(*shape))
        assert qt.nbytes == spec.nbytes(shape)
    assert spec.bits_per_param(shape) == pytest.approx(8 * spec.nbytes(shape) / (shape[0] * shape[1]))


def test_preset_bits_and_roles():
    assert PRESETS["a4e2"].expert.bits_per_param() <= 2.7
    assert 3 < PRESETS["a4e3"].expert.bits_per_param() < 3.5
    assert 4 < PRESETS["a4e4"].expert.bits_per_param() < 4.5
    assert PRESETS["none"].spec("expert").bits_per_param() == 16
    for preset in PRESETS.values():
        for role in ("router", "norm", "embedding", "lm_head"):
            assert preset.spec(role).fmt == "none"
    w = torch.randn(8, 8)
    assert PRESETS["a4e2"].spec("router").quantize(w) is w
    with pytest.raises(ValueError, match="a4e2"):
        get_preset("a2e1")
    with pytest.raises(ValueError, match="role"):
        PRESETS["a4e2"].spec("mlp")


def test_metadata_quantization_is_8bit_and_tight():
    v = torch.rand(1000) * 3
    codes, affine = quantize_meta(v, 8, 128)
    assert codes.dtype == torch.uint8 and codes.numel() == 1024 and affine.shape == (8, 2)
    back = dequantize_meta(codes, affine, 1000)
    assert (back - v).abs().max() <= affine[:, 0].max() / 2 + 1e-6
    qt = quantize(torch.randn(64, 256), 2, 16)  # meta is stored as codes, not 16-bit values
    assert qt.tensors["scale_q"].dtype == torch.uint8 and "scale" not in qt.tensors
    assert qt.bits_per_param < quantize(torch.randn(64, 256), 2, 16, meta_bits=None).bits_per_param


@settings(max_examples=25, deadline=None)
@given(bits=st.sampled_from([2, 3, 4]), n=st.integers(1, 130), k=st.sampled_from([8, 16, 40]), seed=st.integers(0, 99))
def test_layout_round_trip(bits, n, k, seed):
    codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, k)[:n], codes)


def _entries(draw_spec):
    out = {}
    for i, (kind, rows) in enumerate(draw_spec):
        w = torch.randn(rows, 64)
        if kind == "dense":
            out[f"t{i}"] = w.to(torch.bfloat16)
        elif kind == "nf4":
            out[f"t{i}"] = quantize(w, 4, 64, fmt="nf4")
        else:
            out[f"t{i}"] = quantize(w, kind, 32)
    return out


KINDS = ["dense", 2, 3, 4, *(["nf4"] if bitsandbytes_runs_here() else [])]


@settings(max_examples=15, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(KINDS), st.integers(1, 70)), min_size=1, max_size=4))
def test_pack_unpack_round_trip_zero_copy_aligned(spec):
    entries = _entries(spec)
    blob = pack_expert(entries)
    assert blob.dtype == torch.uint8 and blob.dim() == 1 and blob.data_ptr() % 256 == 0
    lo, hi = blob.data_ptr(), blob.data_ptr() + blob.numel()
    back = unpack_expert(blob)
    assert back.keys() == entries.keys()
    for name, e in entries.items():
        b = back[name]
        views = b.tensors.values() if isinstance(b, QuantizedTensor) else [b]
        for v in views:
            assert lo <= v.data_ptr() < hi and v.data_ptr() % 256 == 0
        if isinstance(e, QuantizedTensor):
            assert b.fmt == e.fmt and b.shape == e.shape and b.params == e.params
            assert torch.equal(b.dequantize(), e.dequantize())
        else:
            assert torch.equal(b, e)
    blob[read_index(blob)["base"]:].zero_()  # views really alias the blob
    assert all(not torch.any(v != 0) for v in (back["t0"].tensors.values() if isinstance(back["t0"], QuantizedTensor)
                                                 else [back["t0"]]))


def test_unpack_rejects_foreign_bytes():
    with pytest.raises(ValueError, match="magic"):
        unpack_expert(torch.zeros(512, dtype=torch.uint8))


def test_nf4_matches_bitsandbytes():
    """NF4 is bitsandbytes' bytes where its CPU library runs. On an x86-64 CPU without AVX2 that library dies of
    SIGILL (seen under `make test-cpus`), so there NF4 is a one-line error naming the HQQ alternative."""
    w = torch.randn(64, 128)
    if not bitsandbytes_runs_here():
        raises_one_line(lambda: quantize(w, 4, 64, fmt="nf4"), OffloadError, "AVX2", "quant='a4e4'")
        return
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(w.bfloat16(), blocksize=64, compress_statistics=True, quant_type="nf4")
    ref = bnbf.dequantize_4bit(packed, state)
    qt = quantize(w, 4, 64, fmt="nf4")
    assert torch.equal(qt.dequantize(torch.bfloat16), ref)
    assert qt.bits_per_param == pytest.approx(4.13, abs=0.01)


def test_mxfp4_matches_transformers_decoder():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(1)
    blocks = torch.randint(0, 256, (2, 48, 3, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(118, 134, (2, 48, 3), dtype=torch.uint8, generator=g)
    ref = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)  # [E, cols, rows]
    for e in range(2):
        qt = from_mxfp4(blocks[e], scales[e])
        assert qt.shape == (48, 96) and qt.bits_per_param == 4.25
        assert torch.equal(qt.dequantize(torch.bfloat16), ref[e].t())


def test_fp8_block_dequant_matches_loop():
    w = (torch.randn(200, 300) * 10).to(torch.float8_e4m3fn)
    s = torch.rand(2, 3) + 0.1
    ref = torch.empty(200, 300)
    for i in range(2):
        for j in range(3):
            ref[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].float() * s[i, j]
    assert torch.equal(dequantize_fp8_blocks(w, s, dtype=torch.float32), ref)
    with pytest.raises(ValueError, match="weight_scale_inv"):
        dequantize_fp8_blocks(w, torch.ones(1, 1))


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=5, group_size=64), "bit width 5"),
    (dict(bits=2, group_size=48), "group size 48"),
    (dict(bits=4, group_size=128, shape=(64, 96)), "not divisible by the group size 128"),
    (dict(bits=4, group_size=64, nan=True), "NaN/Inf"),
    (dict(bits=4, group_size=64, shape=(4, 4, 64)), "2-D"),
    (dict(bits=2, group_size=64, fmt="nf4"), "NF4 is 4-bit"),
])
def test_bad_input_names_the_tensor(kwargs, match):
    shape = kwargs.pop("shape", (64, 128))
    w = torch.randn(*shape)
    if kwargs.pop("nan", False):
        w[3, 5] = float("nan")
    with pytest.raises(ValueError, match=match) as err:
        quantize(w, name="layers.3.experts.7.w1", **kwargs)
    assert "layers.3.experts.7.w1" in str(err.value)


def test_mxfp4_bad_shapes_named():
    with pytest.raises(ValueError, match="experts.gate_up"):
        from_mxfp4(torch.zeros(4, 2, 8, dtype=torch.uint8), torch.zeros(4, 2, dtype=torch.uint8), name="experts.gate_up")
    with pytest.raises(ValueError, match="scales"):
        from_mxfp4(torch.zeros(4, 2, 16, dtype=torch.uint8), torch.zeros(4, 3, dtype=torch.uint8))
