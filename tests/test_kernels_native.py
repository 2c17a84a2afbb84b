"""Every CPU path this machine can run, against float64 references: our GEMV's AVX2 build, its AVX-512 build
(skipped only where the CPU lacks AVX-512), the portable path (torch's int4pack kernel after an exact
conversion of our tiles; MXFP4 dequantized), and the cases that end there (no compiler, a failed build, no
AVX2, a build the CPU cannot run). Nothing assumes which CPU CI has, nor which layout torch packs."""
import os
import subprocess

import pytest
import torch
from emulation import PYTHON
from offload.bench.kernels import random_mxfp4
from offload.kernels import dispatch, native, prepare, qmatmul
from offload.kernels.cpu import Int4PackWeight, TileWeight
from offload.quant import quantize
from offload.quant.layout import unpack_codes
from offload.quant.mxfp4 import FP4_VALUES

PATHS = ("avx2", "avx512", "portable")
ROWS = (1, 2, 3, 4, 5, 8, 9, 17)  # 1-4 rows per pass, remainders, beyond the old 8-row limit


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """Prepare for one path: MOE_OFFLOAD_ISA is read at every prepare (whatever the outer environment says)."""
    if request.param != "portable" and request.param not in native.cpu_isas():
        pytest.skip(f"this CPU cannot run the {request.param} build")
    monkeypatch.delenv("MOE_OFFLOAD_NATIVE", raising=False)
    monkeypatch.setenv("MOE_OFFLOAD_ISA", request.param)
    if request.param != "portable":
        assert native.build(request.param) is not None  # the machines of this project have a compiler
    return request.param


def tiles_reference(p: TileWeight) -> torch.Tensor:
    """The weight our tiles encode, float64 [n_pad, K]: (code - 2^(bits-1)) * s + z per group, or
    2 * e2m1(code) * s for FP4 (read back with the layout's own unpacker, not the kernel's logic)."""
    k = p.scale_zeros.shape[0] * p.group_size
    bits = 2 if p.codes == "int2" else 4
    codes = unpack_codes({"qweight": p.packed}, bits, k)
    s, z = (p.scale_zeros[..., i].double().t().repeat_interleave(p.group_size, 1) for i in (0, 1))
    if p.codes == "fp4":
        return 2 * torch.tensor(FP4_VALUES, dtype=torch.float64)[codes.long()] * s
    return (codes.double() - 2 ** (bits - 1)) * s + z


def rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).abs().max() / ref.abs().max())


def test_the_builds_this_cpu_runs_are_there():
    """Every build the CPU can run (AVX2+FMA: avx2; AVX-512 F/BW/VL/DQ: both) compiles and loads, and by default
    the best is taken; a CPU with neither (`make test-cpus` emulates one) takes the portable path. The project's
    machines have a C compiler, so nothing here may quietly fall back."""
    capability = torch.backends.cpu.get_cpu_capability()
    assert ("avx2" in native.cpu_isas()) == (capability in ("AVX2", "AVX512"))
    assert ("avx512" in native.cpu_isas()) == (capability == "AVX512")
    for isa in native.cpu_isas():
        assert native.build(isa).isa == isa
        assert list(native.cache_dir().glob(f"q_gemv-{isa}-*.so"))
    if "MOE_OFFLOAD_NATIVE" not in os.environ and "MOE_OFFLOAD_ISA" not in os.environ:
        best = native.gemv()
        assert (best.isa if best else None) == (native.cpu_isas()[-1] if native.cpu_isas() else None)


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (4, 128), (3, 64), (3, 128), (2, 32), (2, 128)])
def test_hqq_matches_reference(path, bits, group):
    torch.manual_seed(bits * 1000 + group)
    qt = quantize(torch.randn(100, 512), bits, group)  # 100 rows: a padded tile
    p = prepare(qt)
    dense = qt.dequantize(torch.float64)
    for m in ROWS:
        x = torch.randn(m, 512)
        y = p.matmul(x)
        assert y.shape == (m, 100) and y.dtype == torch.float32
        if path == "portable":  # torch's kernel: bf16 activations and output, fp32 sums
            assert isinstance(p, Int4PackWeight)
            assert rel(y, x.bfloat16().double() @ dense.t()) < 8e-3
        else:
            assert isinstance(p, TileWeight) and p.gemv.isa == path
            assert p.codes == ("int2" if bits == 2 else "int4")  # 2-bit read as stored; 3-bit become nibbles
            assert rel(y, x.double() @ tiles_reference(p)[:100].t()) < 1e-5  # the kernel: exact in fp32
            assert rel(y, x.double() @ dense.t()) < 5e-3  # the tiles: the weight, up to bf16 (s, z') pairs


@pytest.mark.parametrize("bits,group", [(4, 64), (2, 32)])
def test_stacked_rows_compute_each_part_as_alone(path, bits, group):
    """q, k and v stacked into one GEMV (attention's fused qkv): every part's rows bit for bit as its own call;
    parts of another kind, or whose rows leave padding between them, are not stacked."""
    from offload.kernels.cpu import stacked_rows

    g = torch.Generator().manual_seed(bits)
    parts = [prepare(quantize(torch.randn(n, 256, generator=g), bits, group)) for n in (128, 64, 100)]
    fused = stacked_rows(parts)
    if path == "portable":
        assert fused is None
        return
    x = torch.randn(3, 256, generator=g)
    assert torch.equal(fused.matmul(x), torch.cat([p.matmul(x) for p in parts], -1))
    assert stacked_rows([parts[2], parts[0]]) is None  # 100 rows: a padded tile in the middle
    other = prepare(quantize(torch.randn(64, 256, generator=g), 6 - bits, 64))
    assert stacked_rows([parts[0], other]) is None


def test_mxfp4_matches_its_dequantized_weight(path):
    """MXFP4 (gpt-oss experts): our GEMV on the e2m1 codes as they are; the portable path dequantizes."""
    qt = random_mxfp4((100, 320), seed=3)
    p = prepare(qt)
    dense = qt.dequantize(torch.float64)
    if path != "portable":
        assert isinstance(p, TileWeight) and p.codes == "fp4"
        assert torch.equal(tiles_reference(p)[:100], dense)  # the tiles hold the same weight, exactly
    for m in ROWS:
        x = torch.randn(m, 320)
        assert rel(p.matmul(x), x.double() @ dense.t()) < 1e-5


def test_qmatmul_keeps_the_prepared_form(path, monkeypatch):
    """A raw QuantizedTensor is prepared once (it cost 40x the product per call), and prepared again when its
    bytes are written in place (a reused slot) or the path changes."""
    qt = quantize(torch.randn(64, 128), 4, 64)
    x = torch.randn(2, 128)
    calls = []
    real = dispatch.prepare
    monkeypatch.setattr(dispatch, "prepare", lambda *a: calls.append(a) or real(*a))
    first = qmatmul(x, qt)
    assert torch.equal(qmatmul(x, qt), first) and len(calls) == 1
    assert torch.equal(first, real(qt).matmul(x))
    qt.tensors["qweight"].bitwise_xor_(0x11)  # every code changes
    changed = qmatmul(x, qt)
    assert len(calls) == 2 and torch.equal(changed, real(qt).matmul(x)) and not torch.equal(changed, first)
    monkeypatch.setenv("MOE_OFFLOAD_ISA", "portable" if path != "portable" else "avx2")
    qmatmul(x, qt)
    assert len(calls) == 3


@pytest.mark.parametrize("path", ["avx2", "avx512"], indirect=True)  # ours; torch's kernel is not ours to promise
@pytest.mark.parametrize("bits", [2, 4])
def test_result_does_not_depend_on_thread_count(path, bits):
    torch.manual_seed(1)
    p = prepare(quantize(torch.randn(2048, 256), bits, 64))  # enough tiles for the parallel loop
    x = torch.randn(3, 256)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = p.matmul(x)
        torch.set_num_threads(2)
        two = p.matmul(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


FALLBACK = """
import logging, torch
logging.basicConfig(level=logging.INFO, format="%(message)s")
from offload.bench.kernels import random_hqq
from offload.kernels import native, prepare
from offload.kernels.cpu import Int4PackWeight
from offload.quant.mxfp4 import from_mxfp4
torch.manual_seed(0)
x = torch.randn(3, 128)
good = []
for bits in (4, 3, 2):
    qt = random_hqq(bits, 32, (64, 128))
    p = prepare(qt)
    ref = x.bfloat16().double() @ qt.dequantize(torch.float64).t()
    good.append(isinstance(p, Int4PackWeight) and float((p.matmul(x) - ref).abs().max() / ref.abs().max()) < 8e-3)
blocks = torch.randint(0, 256, (64, 4, 16), dtype=torch.uint8)
fp4 = from_mxfp4(blocks, torch.full((64, 4), 127, dtype=torch.uint8))
good.append(torch.equal(prepare(fp4).matmul(x), x @ fp4.dequantize(torch.float32).t()))  # dequantizes
print("kernel", native.gemv() is not None, "portable path right", all(good))
"""


@pytest.mark.parametrize("env,reason", [({"MOE_OFFLOAD_NATIVE": "0"}, None),
                                        ({"CC": "false"}, "building q_gemv.c failed"),
                                        ({"CC": "no-such-compiler"}, "no C compiler"),
                                        ({"ATEN_CPU_CAPABILITY": "default"}, "this CPU has no AVX2"),
                                        ({"ATEN_CPU_CAPABILITY": "avx2", "MOE_OFFLOAD_ISA": "avx512"},
                                         "cannot run the avx512 build")])
def test_without_our_kernel_the_portable_path_serves(tmp_path, env, reason):
    """Each reason to go without our GEMV, in a fresh process with an empty build cache. torch honours
    ATEN_CPU_CAPABILITY, so "default" stands for a CPU without AVX2 and "avx2" for one without AVX-512,
    down to the int4pack layout torch packs. On a CPU without AVX2 (`make test-cpus`) no build is tried, so that
    is the reason, and torch cannot be set above the CPU."""
    if not native.cpu_isas():
        env = {k: v for k, v in env.items() if k != "ATEN_CPU_CAPABILITY"}
        reason = "this CPU has no AVX2" if reason in ("building q_gemv.c failed", "no C compiler") else reason
    run_env = {k: v for k, v in os.environ.items()
               if k not in ("MOE_OFFLOAD_NATIVE", "MOE_OFFLOAD_ISA", "ATEN_CPU_CAPABILITY")}
    run_env.update(MOE_OFFLOAD_CACHE=str(tmp_path), **env)
    out = subprocess.run([*PYTHON, "-c", FALLBACK], env=run_env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "kernel False portable path right True" in out.stdout
    if reason:
        assert reason in out.stderr
    assert not list(tmp_path.rglob("*.so")) and not list(tmp_path.rglob("*.tmp*"))


def test_builds_are_cached_per_instruction_set(tmp_path):
    """Each build has its own file (the hash covers the flags), and a second process loads them as built."""
    code = "from offload.kernels import native; print(all(native.build(i) for i in native.cpu_isas()))"
    env = {**os.environ, "MOE_OFFLOAD_CACHE": str(tmp_path)}
    builds = []
    for _ in range(2):
        out = subprocess.run([*PYTHON, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert out.stdout.strip() == "True", out.stderr
        builds.append({p.name: p.stat().st_mtime_ns for p in tmp_path.rglob("*.so")})
    assert len(builds[0]) == len(native.cpu_isas()) and builds[0] == builds[1]
    assert not list(tmp_path.rglob("*.tmp*"))
