"""The MoE dispatch: grouped expert products against one-by-one experts, and results that do not depend on how
a provider batches its experts."""
import pytest
import torch

from offload.model.moe import GROUPED_MAX_BYTES, expert_mlp, grouped_expert_mlp, moe
from offload.spec import ExpertSpec, RouterSpec


def _expert(g: torch.Generator, biases: bool) -> dict[str, torch.Tensor]:
    w = {"gate": torch.randn(24, 16, generator=g), "up": torch.randn(24, 16, generator=g),
         "down": torch.randn(16, 24, generator=g)}
    if biases:
        w |= {"gate_bias": torch.randn(24, generator=g), "up_bias": torch.randn(24, generator=g),
              "down_bias": torch.randn(16, generator=g)}
    return w


@pytest.mark.parametrize("rows", [1, 2, 5])
@pytest.mark.parametrize("activation,biases", [("swiglu", False), ("swiglu_clamp", True)])
def test_grouped_matches_one_by_one(rows, activation, biases):
    g = torch.Generator().manual_seed(rows)
    e = ExpertSpec(24, activation=activation)
    experts = [_expert(g, biases) for _ in range(rows)]
    x = torch.randn(rows, 16, generator=g)
    want = torch.cat([expert_mlp(x[i:i + 1], w, e) for i, w in enumerate(experts)])
    torch.testing.assert_close(grouped_expert_mlp(x, experts, e), want, rtol=1e-5, atol=1e-5)


def test_grouped_row_does_not_depend_on_its_batch():
    """Padded to the same size, a row's result is bitwise the same alone or among others (CPU torch's bmm
    rounds a batch of one differently; cuBLAS picks kernels by batch size)."""
    g = torch.Generator().manual_seed(0)
    e, experts, x = ExpertSpec(24), [_expert(g, False) for _ in range(4)], torch.randn(4, 16, generator=g)
    full = grouped_expert_mlp(x, experts, e, rows=4)
    for i in range(4):
        assert torch.equal(grouped_expert_mlp(x[i:i + 1], experts[i:i + 1], e, rows=4), full[i:i + 1])
        assert torch.equal(grouped_expert_mlp(x[i:i + 2], experts[i:i + 2], e, rows=4), full[i:i + 2])


class _Batched:
    """A provider that hands out experts `size` at a time (as the offload engine does when slots are short)."""

    def __init__(self, experts: dict, size: int) -> None:
        self.experts, self.size = experts, size

    def provide(self, layer, experts, weights, tokens, prefetch):
        for i in range(0, len(experts), self.size):
            yield [(e, self.experts[e]) for e in experts[i:i + self.size]]


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("tokens", [1, 3])
def test_batching_does_not_change_the_output(tokens, grouped, monkeypatch):
    """Offloaded runs get experts in several batches, resident ones in one: the output must be the same,
    one by one (the CPU default) and grouped (the GPU default, forced here)."""
    if grouped:
        monkeypatch.setitem(GROUPED_MAX_BYTES, "cpu", 1 << 30)
    g = torch.Generator().manual_seed(tokens)
    experts = {i: _expert(g, False) for i in range(6)}
    router = RouterSpec(num_experts=6, top_k=2, scoring="softmax", renormalize=True)
    x = torch.randn(1, tokens, 16, generator=g)
    ids = torch.stack([torch.randperm(6, generator=g)[:2] for _ in range(tokens)])
    weights = torch.rand(tokens, 2, generator=g)
    out = [moe(x, 0, weights, ids, router, ExpertSpec(24), _Batched(experts, size), [], 0) for size in (1, 2, 6)]
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])
