"""Budget planner: from free device memory, host RAM and the model's sizes, choose expert slots per MoE
layer, the KV budget and the placement, and explain the choice in one table."""
from __future__ import annotations

import time
from dataclasses import dataclass

import psutil
import torch

from ..spec import LinearAttentionSpec, ModelSpec

HEADROOM = 0.9  # leave 10% of free memory for activations, allocator slack and other processes


def measure_bandwidth(device: torch.device, megabytes: int = 256) -> tuple[float, float]:
    """(host read GB/s, host->device copy GB/s): what the Fiddler cost model compares."""
    src = torch.ones(megabytes << 18, dtype=torch.float32)  # megabytes MB
    src.sum()
    start = time.perf_counter()
    src.sum()
    host = src.nbytes / (time.perf_counter() - start) / 1e9
    if device.type != "cuda":
        return host, host
    src = src.pin_memory()
    dst = torch.empty_like(src, device=device)
    dst.copy_(src)
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(device)
    return host, src.nbytes / (time.perf_counter() - start) / 1e9


def free_device_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def kv_bytes(spec: ModelSpec, context: int, dtype_bytes: int) -> int:
    """KV cache bytes for one sequence of `context` tokens (sliding layers hold only their window, MLA layers
    their latent and rotary key, linear-attention layers a fixed state)."""
    total = 0
    for layer in spec.layers:
        a = layer.attention
        if isinstance(a, LinearAttentionSpec):
            total += a.num_v_heads * a.k_head_dim * a.v_head_dim * 4 + a.conv_channels * (a.conv_kernel - 1) * dtype_bytes
            continue
        positions = min(context, a.window) if a.window else context
        heads, k_dim, v_dim = a.cache_dims()
        total += positions * heads * (k_dim + v_dim) * dtype_bytes
    return total


@dataclass(frozen=True)
class Link:
    """Measured costs that decide what to do with an expert that has no device slot: copy it in, or compute it
    on the host where it lives (placement "split")."""
    copy_gbps: float  # host -> device copy bandwidth, GB/s
    cpu_expert_seconds: float  # one decode token through one expert on the host's native kernels

    def copy_seconds(self, expert_bytes: int) -> float:
        return expert_bytes / (self.copy_gbps * 1e9)


@dataclass
class Plan:
    device: str
    free_device: int
    dense_bytes: int
    kv_bytes: int
    context: int
    expert_bytes: int
    num_experts: int
    moe_layers: int
    slots_per_layer: int
    host_available: int
    placement: str  # "resident" | "inclusive" | "exclusive" | "split"
    link: Link | None = None
    reason: str = ""

    @property
    def cache_bytes(self) -> int:
        return self.slots_per_layer * self.moe_layers * self.expert_bytes

    @property
    def all_experts_bytes(self) -> int:
        return self.num_experts * self.moe_layers * self.expert_bytes

    def rows(self) -> list[tuple[str, str]]:
        gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
        return [
            ("compute device", self.device), ("free device memory", gib(self.free_device)),
            ("resident non-expert weights", gib(self.dense_bytes)),
            (f"KV cache ({self.context} tokens)", gib(self.kv_bytes)),
            ("one expert (packed)", f"{self.expert_bytes / 2**20:.2f} MiB"),
            ("all routed experts", gib(self.all_experts_bytes)),
            ("expert slots per MoE layer", f"{self.slots_per_layer} of {self.num_experts}"),
            ("device expert cache", gib(self.cache_bytes)), ("host RAM available", gib(self.host_available)),
            *self._link_rows(), ("placement", self.placement), *([("why", self.reason)] if self.reason else []),
        ]

    def _link_rows(self) -> list[tuple[str, str]]:
        if self.link is None:
            return []
        return [("host->device copy (measured)", f"{self.link.copy_gbps:.1f} GB/s: "
                 f"{self.link.copy_seconds(self.expert_bytes) * 1e3:.2f} ms an expert"),
                ("CPU expert, 1 token (measured)", f"{self.link.cpu_expert_seconds * 1e3:.2f} ms")]

    def explain(self) -> str:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="offload plan", show_header=False)
        for key, value in self.rows():
            table.add_row(key, value)
        console = Console(record=True, width=80)
        with console.capture() as capture:
            console.print(table)
        return capture.get()


def plan(spec: ModelSpec, dense_bytes: int, expert_bytes: int, device: torch.device, dtype_bytes: int,
         context: int = 4096, free_device: int | None = None, host_available: int | None = None,
         link: Link | None = None) -> Plan:
    """Give the experts whatever device memory the dense weights and the KV cache leave. With `link` measured
    (a CUDA device), an expert without a slot is computed on the CPU (placement "split": the slots keep each
    layer's hottest experts, the CPU runs the rest while the GPU runs those) when that is faster than copying it."""
    free = free_device_memory(device) if free_device is None else free_device
    host = psutil.virtual_memory().available if host_available is None else host_available
    kv = kv_bytes(spec, context, dtype_bytes)
    num_experts = spec.router.num_experts if spec.router else 0
    layers = len(spec.moe_layers)
    budget = int(free * HEADROOM) - dense_bytes - kv
    if budget <= 0 and layers:
        raise MemoryError(f"the model's non-expert weights and KV cache need {(dense_bytes + kv) / 2**30:.2f} GiB "
                          f"but {device} has {free / 2**30:.2f} GiB free; use a smaller context or a lower-bit preset")
    slots = min(num_experts, budget // max(1, expert_bytes * layers)) if layers else 0
    if layers and slots < 1:
        raise MemoryError(f"{device} has room for no expert slot ({budget / 2**20:.0f} MiB left after weights and "
                          "KV cache); use a lower-bit preset or a shorter context")
    all_experts = num_experts * layers * expert_bytes
    placement, reason = _placement(device, slots, num_experts, all_experts > host * HEADROOM, expert_bytes, link)
    return Plan(str(device), free, dense_bytes, kv, context, expert_bytes, num_experts, layers, int(slots), host,
                placement, link, reason)


def _placement(device: torch.device, slots: int, num_experts: int, host_too_small: bool, expert_bytes: int,
               link: Link | None) -> tuple[str, str]:
    """(placement, why) for an expert cache of `slots` of `num_experts` per layer."""
    if slots == num_experts:
        return "resident", "every expert fits on the device"
    if device.type == "cuda" and host_too_small:
        return "exclusive", "host RAM cannot also hold the experts the device holds"
    if device.type != "cuda" or link is None:
        return "inclusive", ""
    copy, cpu = link.copy_seconds(expert_bytes), link.cpu_expert_seconds
    if cpu < copy:
        return "split", (f"the CPU computes an expert for one token ({cpu * 1e3:.2f} ms) faster than the link copies "
                         f"it ({copy * 1e3:.2f} ms): each layer's {slots} hottest experts stay on the GPU, the CPU "
                         "computes the others while the GPU runs them")
    return "inclusive", (f"copying an expert ({copy * 1e3:.2f} ms) is faster than computing it on the CPU "
                         f"({cpu * 1e3:.2f} ms): missed experts are copied into the slots")
