"""decode_attention (q_gemv.c), every build this CPU runs, against a float64 reference: grouped queries, sinks,
left padding (a row with every key blocked), value heads of another width, keys strided as the KV cache
holds them (head-major slices, sequence-major storage), bf16 and fp32 caches, head sizes off the vector width."""
import pytest
import torch

from offload.kernels import native
from offload.model.attention import NATIVE_MAX_TOKENS


@pytest.fixture(params=["avx2", "avx512"])
def gemv(request):
    if request.param not in native.cpu_isas():
        pytest.skip(f"this CPU cannot run the {request.param} build")
    return native.build(request.param)


def reference(q, k, v, blocked, sinks, scale):
    """float64: [B, T, Hq, Dv]."""
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = (q @ k.transpose(2, 3)) * scale  # [B, Hq, T, S]
    scores = scores.masked_fill(blocked[:, None].bool(), torch.finfo(torch.float64).min)
    if sinks is not None:
        scores = torch.cat((scores, sinks.double().view(1, -1, 1, 1).expand(*scores.shape[:3], 1)), -1)
    probs = torch.softmax(scores, -1)[..., :k.shape[2]]
    return (probs @ v).transpose(1, 2)


def keys(shape, dtype, layout, g):
    """A [B, H, S, D] view as the cache hands it out: a slice of bigger head-major storage, or sequence-major."""
    B, H, S, D = shape
    if layout == "head-major":
        return torch.randn(B, H, S + 7, D, generator=g).to(dtype)[:, :, :S]
    return torch.randn(S, B, H, D, generator=g).to(dtype).permute(1, 2, 0, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["head-major", "sequence-major"])
@pytest.mark.parametrize("T,S", [(1, 1), (1, 37), (3, 5), (NATIVE_MAX_TOKENS, 300)])
@pytest.mark.parametrize("D,Dv,sinks", [(16, 16, False), (24, 16, True), (64, 64, False), (20, 36, True)])
def test_matches_float64(gemv, dtype, layout, T, S, D, Dv, sinks):
    g = torch.Generator().manual_seed(S * 100 + T * 10 + D)
    B, Hq, Hkv = 2, 8, 2
    q = torch.randn(B, Hq, T, D, generator=g).to(dtype).float()  # as the model hands it over
    k = keys((B, Hkv, S, D), dtype, layout, g)
    v = keys((B, Hkv, S, Dv), dtype, layout, g)
    blocked = torch.rand(B, T, S, generator=g) < 0.3
    blocked[0, 0] = True  # left padding: no key at all
    sink = torch.randn(Hq, generator=g) if sinks else None
    scale = D ** -0.5
    got = gemv.attention(q, k, v, blocked.to(torch.uint8), sink, scale)
    want = reference(q, k, v, blocked, sink, scale)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_result_does_not_depend_on_thread_count(gemv):
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 16, 4, 64, generator=g), torch.randn(1, 4, 500, 64, generator=g), \
        torch.randn(1, 4, 500, 64, generator=g)
    blocked = (torch.rand(1, 4, 500, generator=g) < 0.2).to(torch.uint8)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(gemv.attention(q, k.bfloat16(), v.bfloat16(), blocked, None, 0.125))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(results[0], r) for r in results[1:])
