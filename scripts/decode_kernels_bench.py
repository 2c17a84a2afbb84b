"""Focused run of the issue-16 parts of offload-bench kernels (same functions): dense GEMV vs F.linear and one
OLMoE MoE layer fused vs per expert, rows 1 and 4, side by side, 1 GB rotation, medians of 5 passes."""
import json, sys, torch
import torch.nn.functional as F
from offload.bench.kernels import _copies, _interleaved, moe_layer_speed, stream_bandwidth_gbs, ROTATE_BYTES
from offload.kernels.dense import dense_linear
from offload.kernels import native
torch.set_num_threads(2)
out = {"isa": native.gemv().isa, "stream_read_gbs": stream_bandwidth_gbs(ROTATE_BYTES)}
n, k = 4096, 14336
for rows in (1, 4):
    cases, res = {}, {}
    for name, dtype, size in (("bf16", torch.bfloat16, 2), ("fp32", torch.float32, 4)):
        x = torch.randn(rows, k).to(dtype)
        ws = [torch.randn(n, k, dtype=dtype) for _ in range(_copies(n * k * size, ROTATE_BYTES))]
        for label, fn in ((f"torch-F.linear-{name}", lambda w, x=x: F.linear(x, w)), (f"ours-dense-{name}", lambda w, x=x: dense_linear(x, w))):
            cases[label] = (fn, ws)
            res[label] = {"copies": len(ws), "bytes_read": n * k * size}
    out[f"dense_rows{rows}"] = _interleaved(cases, res, 5)
    del cases, ws
    out[f"moe_rows{rows}"] = moe_layer_speed(rows, ROTATE_BYTES, 5)
out["stream_read_gbs_after"] = stream_bandwidth_gbs(ROTATE_BYTES)
json.dump(out, open(sys.argv[1], "w"), indent=1)
for key, v in out.items():
    if isinstance(v, dict):
        for name, r in v.items():
            print(key, name, f"{r['ms']:.3f} ms", f"{r['gbs']:.1f} GB/s", [round(p, 3) for p in r["passes_ms"]])
    else:
        print(key, v)
