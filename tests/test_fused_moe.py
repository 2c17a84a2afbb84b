"""The fused CPU MoE layer (kernels/fused_moe.py, q_gemv.c moe_layer) and the dense GEMV (kernels/dense.py)
against float64 references, on every build this CPU runs: every weight form, both activations, sizes that
are not multiples of the tiles, 1-8 rows; each pair's result independent of which experts share the call."""
import pytest
import torch
import torch.nn.functional as F
from offload.bench.kernels import random_mxfp4
from offload.kernels import dense, fused_moe, native, prepare
from offload.model.moe import _run_batch
from offload.quant import quantize
from offload.spec import ExpertSpec
from test_kernels_native import tiles_reference

ISAS = ("avx2", "avx512")
FORMS = ("bf16", "fp32", "hqq4", "hqq3", "hqq2", "mxfp4")
H, F_INNER = 96, 160  # neither a multiple of 64 rows; 96 and 160 are multiples of the 32-column groups


@pytest.fixture(params=ISAS)
def gemv(request, monkeypatch):
    if request.param not in native.cpu_isas():
        pytest.skip(f"this CPU cannot run the {request.param} build")
    monkeypatch.delenv("MOE_OFFLOAD_NATIVE", raising=False)
    monkeypatch.setenv("MOE_OFFLOAD_ISA", request.param)
    built = native.gemv()
    assert built is not None and built.isa == request.param
    return built


def make_weight(form: str, n: int, k: int, seed: int):
    """A weight [n, k] in `form`, and the value its CPU form holds, in float64 (test_kernels_native checks
    that form against the stored weight)."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) / k ** 0.5
    if form in ("bf16", "fp32"):
        t = w.to(torch.bfloat16 if form == "bf16" else torch.float32)
        return t, t.double()
    qt = random_mxfp4((n, k), seed) if form == "mxfp4" else quantize(w, int(form[3]), 32)
    return qt, tiles_reference(prepare(qt))[:n]


def make_expert(form: str, bias: bool, seed: int) -> tuple[dict, dict]:
    weights, exact = {}, {}
    for i, (name, shape) in enumerate((("gate", (F_INNER, H)), ("up", (F_INNER, H)), ("down", (H, F_INNER)))):
        weights[name], exact[name] = make_weight(form, *shape, seed * 3 + i)
        if bias:
            b = torch.randn(shape[0], generator=torch.Generator().manual_seed(seed + 99)).to(torch.bfloat16)
            weights[f"{name}_bias"], exact[f"{name}_bias"] = b, b.double()
    return weights, exact


def reference(x: torch.Tensor, w: dict, e: ExpertSpec) -> torch.Tensor:
    """The eager expert MLP (offload.model.moe.expert_mlp's formulas) in float64."""
    def proj(name, v):
        return v @ w[name].t() + w.get(f"{name}_bias", 0)
    g, u = proj("gate", x), proj("up", x)
    if e.activation == "swiglu":
        h = F.silu(g) * u
    else:
        g, u = g.clamp(max=e.limit), u.clamp(-e.limit, e.limit)
        h = (u + 1) * g * torch.sigmoid(g * e.alpha)
    return proj("down", h)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("clamped", (False, True))
def test_fused_layer_matches_reference(gemv, form, clamped):
    e = ExpertSpec(F_INNER, "swiglu_clamp" if clamped else "swiglu", bias=clamped, limit=0.5)
    experts = [make_expert(form, clamped, seed) for seed in range(4)]
    counts = [1, 3, 8, 2]  # 1-8 rows per expert
    x = torch.randn(sum(counts), H, dtype=torch.float32) * 3
    starts = [0, 1, 4, 12, 14]
    descs = [fused_moe.descriptor(w, gemv, H, F_INNER) for w, _ in experts]
    assert all(d is not None for d in descs)
    out = fused_moe.run(x, descs, counts, F_INNER, clamped, e.alpha, e.limit, gemv)
    for i, (_, exact) in enumerate(experts):
        rows = slice(starts[i], starts[i + 1])
        ref = reference(x[rows].double(), exact, e)
        assert (out[rows].double() - ref).abs().max() <= 1e-5 * ref.abs().max() + 1e-6
    # each expert alone, and in reverse order: the same bits
    for i in range(len(experts)):
        alone = fused_moe.run(x[starts[i]:starts[i + 1]], descs[i:i + 1], counts[i:i + 1], F_INNER, clamped,
                              e.alpha, e.limit, gemv)
        assert torch.equal(alone, out[starts[i]:starts[i + 1]])


def test_run_batch_mixes_fused_and_per_expert(gemv):
    """An expert the kernel cannot read (a strided weight) takes the per-expert path; the others' rows are
    unchanged by its presence, and all match the reference."""
    e = ExpertSpec(F_INNER)
    (a, a_exact), (b, b_exact) = make_expert("hqq4", False, 1), make_expert("bf16", False, 2)
    b = dict(b, down=b["down"].t().contiguous().t())  # same values, not contiguous
    assert fused_moe.descriptor(b, gemv, H, F_INNER) is None
    x = torch.randn(5, H).to(torch.bfloat16)
    both = _run_batch(x, [a, b], [2, 3], e, torch.Size([5, 1]))
    alone = _run_batch(x[:2], [a], [2], e, torch.Size([5, 1]))
    assert torch.equal(both[:2], alone)
    for rows, exact in ((slice(0, 2), a_exact), (slice(2, 5), b_exact)):
        ref = reference(x[rows].double(), exact, e)
        assert (both[rows].double() - ref).abs().max() <= 3e-2 * ref.abs().max()  # bf16 activations


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float32))
@pytest.mark.parametrize("n, k", ((1, 1), (5, 7), (33, 17), (130, 1000)))
def test_dense_gemv_matches_reference(gemv, dtype, n, k):
    w = torch.randn(n, k).to(dtype)
    bias = torch.randn(n).to(dtype)
    last = None
    for m in range(1, 9):
        x = torch.randn(m, k).to(dtype)
        y = dense.dense_linear(x, w, bias)
        assert y.dtype == dtype and y.shape == (m, n)
        ref = x.double() @ w.double().t() + bias.double()
        exact = gemv.dense(x.float(), w, bias).double()  # before rounding to dtype
        assert (exact - ref).abs().max() <= 1e-5 * ref.abs().max() + 1e-6
        assert torch.equal(y, exact.float().to(dtype))
        last = (x, exact)
    # a row's result does not depend on the rows beside it
    assert torch.equal(gemv.dense(last[0][-1:].float(), w, bias)[0], last[1][-1].float())


def test_dense_linear_falls_back(gemv):
    """Shapes and dtypes outside the kernel are F.linear's, exactly."""
    w = torch.randn(16, 32)
    for x, weight in ((torch.randn(9, 32), w), (torch.randn(2, 32).half(), w.half()),
                      (torch.randn(2, 32), w.t().contiguous().t())):
        assert not dense.servable(x, weight, None)
        assert torch.equal(dense.dense_linear(x, weight), F.linear(x, weight))


@pytest.mark.parametrize("arch, quant, sizes", [("mixtral", None, {}), ("gpt_oss", None, {}),
                                                ("olmoe", "a4e3", {"intermediate_size": 64}),
                                                ("qwen3_moe", "a4e2", {"moe_intermediate_size": 64}),
                                                ("gpt_oss", "a4e4", {})])  # MXFP4 experts
def test_offloaded_equals_resident_on_the_fused_path(gemv, monkeypatch, tmp_path, arch, quant, sizes):
    """Decode steps take the fused kernel, bit for bit: resident with the routing handed to it as it is
    (moe_pairs), offloaded in the batches the engine yields (slots and the host tier)."""
    import offload
    from hf_tiny import save_tiny

    calls, pair_calls = [], []
    real, real_pairs = fused_moe.run, native.Gemv.moe_pairs
    monkeypatch.setattr(fused_moe, "run", lambda *a: calls.append(len(a[1])) or real(*a))
    monkeypatch.setattr(native.Gemv, "moe_pairs", lambda self, *a: pair_calls.append(1) or real_pairs(self, *a))
    save_tiny(arch, tmp_path, **sizes)
    prompt = torch.randint(1, 256, (1, 10), generator=torch.Generator().manual_seed(3))
    resident = offload.load(tmp_path, quant=quant).generate(prompt, max_new_tokens=6)
    assert pair_calls and not calls
    offloaded = offload.load(tmp_path, quant=quant, cache_experts=2, miss_policy="cpu")
    assert torch.equal(offloaded.generate(prompt, max_new_tokens=6), resident)
    assert calls
    assert offloaded.stats()["cpu_computed"] > 0 and offloaded.stats()["hits"] > 0


def test_linear_fp32_widens_bf16_weights(gemv):
    """The router's fp32 scores from bf16 weights, without a widened copy: F.linear(x.float(), w.float())."""
    w = torch.randn(64, 96).to(torch.bfloat16)
    x = torch.randn(3, 96).to(torch.bfloat16)
    ref = x.double() @ w.double().t()
    y = dense.linear_fp32(x, w)
    assert y.dtype == torch.float32 and (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_descriptor_is_kept_while_its_weights_are(gemv):
    """Prepared experts keep their descriptor; replacing a weight makes a new one (never stale addresses)."""
    from offload.quantize import prepared

    weights, exact = make_expert("bf16", False, 3)
    w = prepared(weights)
    first = fused_moe.descriptor(w, gemv, H, F_INNER)
    assert first is not None and fused_moe.descriptor(w, gemv, H, F_INNER) is first
    w["up"] = w["up"].clone()
    second = fused_moe.descriptor(w, gemv, H, F_INNER)
    assert second is not first and w["up"].data_ptr() in second and weights["up"].data_ptr() not in second
    x = torch.randn(2, H, generator=torch.Generator().manual_seed(0))
    out = fused_moe.run(x, [second], [2], F_INNER, False, 1.0, 7.0, gemv)
    torch.testing.assert_close(out.double(), reference(x.double(), exact, ExpertSpec(F_INNER)), rtol=2e-5,
                               atol=2e-5)


@pytest.mark.parametrize("tokens", [1, 3, 8])
@pytest.mark.parametrize("form", ["bf16", "hqq2"])
def test_routed_layer_in_one_call_equals_batched_moe(gemv, tokens, form):
    """moe() on resident experts hands the routing to moe_pairs; the same layer through a provider that yields
    experts two at a time (as the offload engine may) takes the batched path: the outputs are equal bit for
    bit, experts hit by several tokens, and experts hit by none, included."""
    from offload.engine.resident import ResidentExperts
    from offload.model.moe import moe
    from offload.quantize import prepared
    from offload.spec import RouterSpec

    experts = {(0, e): prepared(make_expert(form, form == "hqq2", e)[0]) for e in range(6)}
    router = RouterSpec(num_experts=6, top_k=2, scoring="softmax", renormalize=True)
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(1, tokens, H, generator=g).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(5, generator=g)[:2] for _ in range(tokens)])  # expert 5: never hit
    weights = torch.rand(tokens, 2, generator=g)

    class Batched:
        def provide(self, layer, hit, w, t, prefetch):
            for i in range(0, len(hit), 2):
                yield [(e, experts[0, e]) for e in hit[i:i + 2]]

    resident = ResidentExperts(experts)
    one_call = moe(x, 0, weights, ids, router, ExpertSpec(F_INNER), resident, [], 0)
    assert resident.native_table(0, gemv, H, F_INNER) is not None
    assert torch.equal(one_call, moe(x, 0, weights, ids, router, ExpertSpec(F_INNER), Batched(), [], 0))
