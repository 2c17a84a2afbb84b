"""offload.load: checkpoint -> spec -> (quantized) weights -> expert provider (resident or offloaded) -> MoEModel."""
from __future__ import annotations

from pathlib import Path

import torch

from offload.quant import PRESETS

from .engine.offloaded import OffloadedExperts
from .engine.planner import Link, measure_bandwidth, plan
from .engine.policies import POLICIES
from .engine.prefetch import Prefetcher
from .engine.recorder import RoutingRecorder
from .engine.resident import ResidentExperts
from .engine.split import ADAPT_EVERY, SplitExperts, hot_experts, measure_host_expert
from .engine.store import HostStore
from .engine.trace import read_trace
from .lm import MoEModel
from .loader import COMPUTE_DTYPES, Progress, checkpoint_dtype, load_spec, load_weights
from .model.decoder import Decoder
from .model.predictor import load as load_predictors
from .packed import is_packed, open_packed
from .memory import Trimmer, release_freed
from .quantize import prepared, quantizer


def _device(device: str | torch.device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}, but torch sees no CUDA device; use device='cpu' or 'auto'")
    return dev


def _count(name: str, value, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def _check_options(dtype, cache_experts, prefetch: int, policy: str, miss_policy: str, placement: str,
                   context: int, quant, memory_budget, predict_from: str, hot_trace, progress, cuda_graphs) -> None:
    """Every option of `load`, before any file is read: a one-line ValueError naming the option."""
    if not isinstance(cuda_graphs, bool):
        raise ValueError(f"cuda_graphs must be True or False, not {cuda_graphs!r}")
    _choice("dtype", dtype, (None, *COMPUTE_DTYPES))
    if cache_experts not in (None, "auto"):
        _count("cache_experts (None, 'auto' or slots per layer)", cache_experts, 1)
    _count("prefetch", prefetch, 0)
    _choice("policy", policy, POLICIES)
    _choice("miss_policy", miss_policy, ("load", "cpu", "auto"))
    _choice("placement", placement, ("auto", "inclusive", "exclusive", "split"))
    _count("context", context, 1)
    _choice("quant", quant, (None, *PRESETS))
    if memory_budget is not None:
        _count("memory_budget (bytes)", memory_budget, 1)
        if cache_experts != "auto":
            raise ValueError("memory_budget sizes the expert cache the planner chooses: it needs cache_experts='auto'")
    _choice("predict_from", predict_from, ("attention", "output"))
    if hot_trace is not None and placement not in ("split", "auto"):
        raise ValueError(f"hot_trace picks the hot experts of placement='split'; placement={placement!r} has none")
    if progress is not None and not callable(progress):
        raise ValueError(f"progress must be None or a callable progress(stage, done, total), got {progress!r}")


def load(source: str | Path, device: str | torch.device = "auto", dtype: torch.dtype | None = None, *,
         cache_experts: int | str | None = None, prefetch: int = 1, policy: str = "lru",
         miss_policy: str = "load", placement: str = "auto", record_trace: str | Path | None = None,
         context: int = 4096, quant: str | None = None, memory_budget: int | None = None,
         predict_from: str = "attention", hot_trace: str | Path | None = None,
         progress: Progress | None = None, cuda_graphs: bool = True) -> MoEModel:
    """Load a model from a local directory (config.json + *.safetensors + tokenizer), a hub repo id, or
    "demo" (the bundled model).

    cache_experts: None keeps every expert on the compute device; an int k keeps the experts in host
    memory with k device slots per MoE layer; "auto" lets the planner size the slots from free memory
    (its table: `model.plan.explain()`), within `memory_budget` bytes of device memory when given (a global
    budget instead of whatever is free). prefetch: later MoE layers whose experts are predicted and
    copied ahead (predicted from the state after a layer's attention, or with predict_from="output" from
    its output: more accurate, less overlap); policy: eviction policy (offload.engine.policies.POLICIES);
    miss_policy: "load" a missed expert, compute it on the "cpu" where it lives, or "auto" (cost model); placement: "inclusive"
    (the host keeps every expert), "exclusive" (an expert is in a device slot or in the host, for host RAM
    smaller than the experts), "split" (the slots keep each layer's hottest experts, the CPU computes the others
    while the device computes those: from `hot_trace`, a routing trace, or adapted as the model runs) or "auto"
    (the planner decides, from the measured host->device bandwidth and CPU expert time on a GPU);
    record_trace: write routing decisions of decode steps to this JSONL file. quant: a preset of
    offload.quant.PRESETS ("a4e2", "a4e3", "a4e4", "nf4", "none") applied at load. progress: called as
    progress(stage, done, total) during the slow stages of a load (offload-chat draws it). cuda_graphs: on a
    GPU, replay decode and MTP verify steps as CUDA graphs where the step allows it (offload.model.decode_graphs:
    attention layers, 16-bit experts, resident or copied into device slots, prefetch from the attention state);
    False decodes eagerly, to the same bits.
    """
    _check_options(dtype, cache_experts, prefetch, policy, miss_policy, placement, context, quant, memory_budget,
                   predict_from, hot_trace, progress, cuda_graphs)
    dev = _device(device)
    recorder = None if record_trace is None else RoutingRecorder(record_trace)  # checks it can write there
    path, config, spec, adapter = load_spec(source)
    offloaded = cache_experts is not None and bool(spec.moe_layers)
    store = resident = None
    if is_packed(path):  # offload-convert output: experts memory-mapped from disk, checked (offload.packed)
        if quant is not None:
            raise ValueError(f"{path} is a packed checkpoint (offload-convert output), stored as packed: quant="
                             f"{quant!r} cannot apply to it; load the original checkpoint with quant, or drop quant")
        packed = open_packed(path, spec)
        if dtype not in (None, packed.dtype):
            raise ValueError(f"{path} was packed in {packed.dtype}; load it with dtype=None or re-convert")
        dtype, dense, mtp, store = packed.dtype, packed.dense, packed.mtp, packed.store
    else:
        dtype = dtype or checkpoint_dtype(config)
        pin = offloaded and dev.type == "cuda"
        weights = load_weights(path, spec, adapter, dtype, torch.device("cpu") if offloaded else dev,
                               keep_quantized=quant is not None, progress=progress,
                               quantize=quantizer(quant) if quant else None,
                               stage=f"reading and quantizing ({quant})" if quant else "reading weights",
                               expert_form=(lambda w: HostStore.blob(w, pin)) if offloaded else None)
        dense, mtp = weights.dense, weights.mtp
        if offloaded:
            store = HostStore(dict(sorted(weights.experts.items())), pin)
        else:
            resident = weights.experts
    model_plan = None
    if not offloaded:
        if resident is None:
            resident = store.copies(dev)
        experts = ResidentExperts(_prepared_popping(resident), stack=dev.type == "cuda")
        release_freed(collect=False)  # what preparing replaced, before the dense weights are prepared
    else:
        if cache_experts == "auto":
            link = None
            if dev.type == "cuda":
                link = Link(measure_bandwidth(dev)[1],
                            measure_host_expert(store, spec.expert, spec.hidden_size, dtype))
            model_plan = plan(spec, sum(t.nbytes for t in dense.values()), store.blob_bytes, dev, dtype.itemsize,
                              context, free_device=memory_budget, link=link)
            cache_experts = model_plan.slots_per_layer
            placement = model_plan.placement if placement == "auto" else placement
        if not isinstance(cache_experts, int) or isinstance(cache_experts, bool) or cache_experts < 1:
            raise ValueError(f"cache_experts must be None, 'auto' or an int >= 1, got {cache_experts!r}")
        capacity = min(cache_experts, spec.router.num_experts)
        if placement == "split":
            hot = None if hot_trace is None else hot_experts(read_trace(hot_trace), spec.moe_layers, capacity,
                                                             spec.router.num_experts)
            experts = SplitExperts(store, spec.moe_layers, capacity, dev, hot, 0 if hot else ADAPT_EVERY)
        else:
            placement = "exclusive" if placement == "exclusive" else "inclusive"
            experts = OffloadedExperts(store, spec.moe_layers, capacity, dev, policy, miss_policy, placement,
                                       spec.router.top_k, alias=dev.type == "cpu" and placement == "inclusive")
    decoder = Decoder(spec, prepared({k: v.to(dev) for k, v in dense.items()}), experts, dev, dtype)
    if not cuda_graphs:
        decoder.graphs = None
    if offloaded and prefetch and placement != "split":  # a split moves no expert during a call
        decoder.hooks.append(Prefetcher(decoder, prefetch, predict_from=predict_from,
                                        predictors=load_predictors(path, spec.hidden_size, dev, dtype)))
    if recorder is not None:
        decoder.hooks.append(recorder)
    # An offloaded model keeps the MTP layer's routed experts (Qwen3.5-MoE) on the host: they run there
    model = MoEModel(decoder, spec, path, {k: v if offloaded and ".experts." in k else v.to(dev)
                                           for k, v in mtp.items()})
    model.plan = model_plan
    release_freed()  # what the load freed (16-bit weights it quantized, read buffers) goes back to the OS
    return model


def _prepared_popping(experts: dict) -> dict:
    """Each expert's compute-ready form (offload.quantize.prepared), popped as it is prepared so the load never holds
    two copies of the experts; the heap is trimmed as they go, or the forms they replace, freed between the kept ones,
    would stay in glibc's arenas and raise the load's peak (~10% of a 4-bit model)."""
    trimmer, out = Trimmer(), {}
    for key in sorted(experts):
        weights = experts.pop(key)
        trimmer.read(sum(w.nbytes for w in weights.values()))
        out[key] = prepared(weights)
    return out
