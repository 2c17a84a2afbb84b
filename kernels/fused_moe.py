"""A MoE layer's experts on the CPU in one native call (q_gemv.c moe_layer), for decode-sized inputs.

Per call, today's path runs three products and an activation per expert, each a separate torch (or GEMV)
call with its own dispatch and thread start: for a decode step's 8 small experts that overhead is most of
the layer. Here every expert whose weights the kernel reads (bf16 / fp32 dense, our 4/3/2-bit and FP4 tiles,
all on the CPU) runs in one call, parallel over experts and 64-row units. Outputs are per (token, expert)
pair, each computed from its expert's weights and rows alone, so they do not depend on which experts a
provider yields together; the caller weights and sums them as before.
"""
from __future__ import annotations

import itertools
from array import array

import torch

from offload.kernels import native
from offload.kernels.cpu import TileWeight
from offload.kernels.dispatch import prepared_form
from offload.quant.tensor import QuantizedTensor

MAX_TOKENS = 8  # a layer's tokens (decode, MTP verify): beyond, GEMM-shaped work is torch's
_DENSE_KINDS = {torch.float32: 0, torch.bfloat16: 1}
_TILE_KINDS = {"int4": 2, "int2": 3, "fp4": 4}
_PROJECTIONS = ("gate", "up", "down")


def _bias(b: torch.Tensor | None, n: int) -> tuple[int, int] | None:
    """(address, is bf16) of a bias the kernel reads, (0, 0) for none, None if it cannot read it."""
    if b is None:
        return 0, 0
    if b.device.type != "cpu" or b.dtype not in _DENSE_KINDS or not b.is_contiguous() or b.numel() != n:
        return None
    return b.data_ptr(), int(b.dtype == torch.bfloat16)


def _projection(w, b: torch.Tensor | None, gemv: native.Gemv, k: int, n: int) -> list[int] | None:
    """The 8 int64s describing one projection [n, k] to moe_layer, or None if the kernel cannot read it."""
    if isinstance(w, QuantizedTensor):
        if w.device.type != "cpu":
            return None
        w = prepared_form(w, "cpu")
    if isinstance(w, TileWeight):
        if w.gemv is not gemv:
            return None
        shape = (w.out_features, w.scale_zeros.shape[0] * w.group_size)
        head = [_TILE_KINDS[w.codes], w.packed.data_ptr(), w.scale_zeros.data_ptr(), w.group_size,
                w.scale_zeros.shape[1]]
    elif (isinstance(w, torch.Tensor) and w.device.type == "cpu" and w.dtype in _DENSE_KINDS and w.dim() == 2
          and w.is_contiguous()):
        shape = tuple(w.shape)
        head = [_DENSE_KINDS[w.dtype], w.data_ptr(), 0, 0, n]
    else:
        return None
    if shape != (n, k):
        return None
    bias = _bias(b, n)
    return None if bias is None else [*head, *bias, n]


class ExpertWeights(dict):
    """An expert's prepared weights (offload.quantize.prepared makes them), which keep their fused-kernel
    descriptor for as long as they live: building it took ~1 ms of Python per decode token on a 16-layer,
    top-8 model, every layer, every step."""

    descriptor: tuple | None = None  # (the weights and kernel it was made for, the descriptor)


def descriptor(w: dict, gemv: native.Gemv, hidden: int, inner: int) -> list[int] | None:
    """An expert's 3 x 8 int64s (gate, up, down), or None where it must take the per-expert path. Kept on an
    ExpertWeights, valid while it holds the very tensors it was made from (compared by identity)."""
    made_for = (gemv, hidden, inner, *w.values())
    kept = getattr(w, "descriptor", None)
    if kept is not None and len(kept[0]) == len(made_for) and all(a is b for a, b in zip(kept[0], made_for)):
        return kept[1]
    found = _describe(w, gemv, hidden, inner)
    if isinstance(w, ExpertWeights):
        w.descriptor = made_for, found
    return found


def _describe(w: dict, gemv: native.Gemv, hidden: int, inner: int) -> list[int] | None:
    shapes = {"gate": (hidden, inner), "up": (hidden, inner), "down": (inner, hidden)}
    rows = [_projection(w[name], w.get(f"{name}_bias"), gemv, *shapes[name]) for name in _PROJECTIONS]
    if any(r is None for r in rows):
        return None
    gate, up, down = rows
    if (gate[0] >= 2, gate[3]) != (up[0] >= 2, up[3]):
        return None  # gate and up share their rows' group sums
    return gate + up + down


def table(experts: list[dict], gemv: native.Gemv, hidden: int, inner: int) -> tuple[array, int] | None:
    """Every expert's descriptor in one buffer for moe_pairs (experts[i] = expert i), and the output stride;
    None unless the kernel reads them all."""
    found = [descriptor(w, gemv, hidden, inner) for w in experts]
    if any(d is None for d in found):
        return None
    return array("q", [v for d in found for v in d]), max(hidden, *(d[20] for d in found))


def run(x: torch.Tensor, descriptors: list[list[int]], counts: list[int], inner: int, clamped: bool,
        alpha: float, limit: float, gemv: native.Gemv) -> torch.Tensor:
    """x [P, H] (rows grouped by expert, counts[i] for descriptors[i]) -> float32 [P, H], one row per pair."""
    hidden = x.shape[1]
    stride = max(hidden, *(d[20] for d in descriptors))  # a down projection's n_pad
    out = gemv.moe_layer(x.float().contiguous(), descriptors, list(itertools.accumulate(counts, initial=0)), inner,
                         clamped, alpha, limit, stride)
    return out[:, :hidden]
