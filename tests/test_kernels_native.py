"""The AVX2 GEMV (kernels/q_gemv.c) against a float64 reference built from the same prepared tiles."""
import os
import subprocess
import sys

import pytest
import torch
from offload.bench.kernels import random_mxfp4
from offload.kernels import native, prepare
from offload.kernels.cpu import TileWeight
from offload.quant import quantize
from offload.quant.layout import unpack_codes
from offload.quant.mxfp4 import FP4_VALUES


def tiles_reference(p: TileWeight) -> torch.Tensor:
    """The weight the prepared tiles encode, float64 [n_pad, K]: (code - 2^(bits-1)) * s + z per group, or
    2 * e2m1(code) * s for FP4."""
    k = p.scale_zeros.shape[0] * p.group_size
    bits = 2 if p.codes == "int2" else 4
    codes = unpack_codes({"qweight": p.packed}, bits, k)
    s, z = (p.scale_zeros[..., i].double().t().repeat_interleave(p.group_size, 1) for i in (0, 1))
    if p.codes == "fp4":
        return 2 * torch.tensor(FP4_VALUES, dtype=torch.float64)[codes.long()] * s
    return (codes.double() - 2 ** (bits - 1)) * s + z


def test_builds_on_this_machine():
    """CI and the development machines have AVX2 and a C compiler: the fast path must really be taken."""
    assert torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    assert native.library() is not None
    assert list(native.cache_dir().glob("q_gemv-*.so"))


@pytest.mark.parametrize("m", [1, 2, 3, 8])
@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (4, 128), (3, 64), (2, 32)])
def test_gemv_matches_reference(bits, group, m):
    torch.manual_seed(bits * 1000 + group + m)
    p = prepare(quantize(torch.randn(96, 384), bits, group))  # 96 rows: a padded 32-row block
    x = torch.randn(m, 384)
    assert p.codes == ("int2" if bits == 2 else "int4")  # 2-bit tiles are read as stored; 3-bit ones become nibbles
    y = native.q_gemv(x, p.packed, p.codes, p.scale_zeros, group)
    ref = x.double() @ tiles_reference(p).t()
    assert y.shape == (m, 128)
    assert float((y.double() - ref).abs().max() / ref.abs().max()) < 1e-5


@pytest.mark.parametrize("m", [1, 3, 8, 9, 33])
def test_mxfp4_matches_its_dequantized_weight(m):
    """MXFP4 (gpt-oss experts) on the CPU: our GEMV on the e2m1 codes as they are, at any number of rows."""
    qt = random_mxfp4((100, 320), seed=m)  # 100 rows: a padded 64-row tile
    p = prepare(qt)
    assert isinstance(p, TileWeight) and p.codes == "fp4"
    x = torch.randn(m, 320)
    ref = x.double() @ qt.dequantize(torch.float64).t()
    assert torch.equal(tiles_reference(p)[:100], qt.dequantize(torch.float64))  # the tiles hold the same weight
    y = p.matmul(x)
    assert y.shape == (m, 100)
    assert float((y.double() - ref).abs().max() / ref.abs().max()) < 1e-5


@pytest.mark.parametrize("bits", [2, 4])
def test_matmul_takes_it_up_to_eight_rows_and_agrees_with_torchs_kernel(bits):
    torch.manual_seed(bits)
    p = prepare(quantize(torch.randn(160, 512), bits, 64))
    for m in (1, 8, 9):  # 9 rows go to torch's int4pack kernel
        x = torch.randn(m, 512)
        y = p.matmul(x)
        ref = x.double() @ tiles_reference(p)[:160].t()
        torch_kernel = p.matmul_int4pack(x)[:, :160].double()
        scale = ref.abs().max()
        assert float((y.double() - ref).abs().max() / scale) < (1e-5 if m <= native.MAX_ROWS else 1e-2)
        assert float((torch_kernel - ref).abs().max() / scale) < 1e-2


@pytest.mark.parametrize("bits", [2, 4])
def test_result_does_not_depend_on_thread_count(bits):
    torch.manual_seed(1)
    p = prepare(quantize(torch.randn(2048, 256), bits, 64))  # enough blocks for the parallel loop
    x = torch.randn(2, 256)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.q_gemv(x, p.packed, p.codes, p.scale_zeros, 64)
        torch.set_num_threads(2)
        two = native.q_gemv(x, p.packed, p.codes, p.scale_zeros, 64)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


FALLBACK = """
import logging, torch
logging.basicConfig(level=logging.INFO, format="%(message)s")
from offload.kernels import native, prepare
from offload.quant import quantize
from offload.quant.mxfp4 import from_mxfp4
torch.manual_seed(0)
x = torch.randn(1, 128)
same = []
for bits in (4, 2):
    p = prepare(quantize(torch.randn(64, 128), bits, 32))
    same.append(p.codes == "int4" and torch.equal(p.matmul(x), p.matmul_int4pack(x)[:, :64].float()))
blocks = torch.randint(0, 256, (64, 4, 16), dtype=torch.uint8)
fp4 = from_mxfp4(blocks, torch.full((64, 4), 127, dtype=torch.uint8))
same.append(torch.equal(prepare(fp4).matmul(x), x @ fp4.dequantize(torch.float32).t()))  # dequantizes
print("library", native.library() is not None, "torch kernel", all(same))
"""


@pytest.mark.parametrize("env,reason", [({"MOE_OFFLOAD_NATIVE": "0"}, None),
                                        ({"CC": "false"}, "building q_gemv.c failed"),
                                        ({"CC": "no-such-compiler"}, "no C compiler")])
def test_without_the_kernel_torchs_kernel_serves(tmp_path, env, reason):
    run_env = {**os.environ, "MOE_OFFLOAD_CACHE": str(tmp_path), **env}
    out = subprocess.run([sys.executable, "-c", FALLBACK], env=run_env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "library False torch kernel True" in out.stdout
    if reason:
        assert reason in out.stderr
    assert not list(tmp_path.rglob("*.so")) and not list(tmp_path.rglob("*.tmp*"))


def test_compiled_library_is_cached(tmp_path):
    code = "from offload.kernels import native; print(native.library() is not None)"
    env = {**os.environ, "MOE_OFFLOAD_CACHE": str(tmp_path)}
    mtimes = []
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert out.stdout.strip() == "True", out.stderr
        (built,) = tmp_path.rglob("*.so")
        mtimes.append(built.stat().st_mtime_ns)
    assert mtimes[0] == mtimes[1]  # the second process loaded the first one's build
