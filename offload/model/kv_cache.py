"""KV cache. Full-attention layers keep every position; sliding-window layers keep a ring of exactly `window`
entries, and linear-attention layers a fixed-size state (LinearState), so their memory is constant in sequence
length. Storage grows as entries are written (doubling, from
CHUNK entries, up to the layer's capacity), so a generous max_new_tokens costs nothing until it is generated.

Every cache entry records the sequence index it holds (-1 = empty) and, per batch row, whether it is a
real token (left padding is not), so attention masks come from the cache itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..spec import AttentionSpec, LinearAttentionSpec

CHUNK = 256  # entries first allocated per layer

@dataclass
class KeysView:
    k: torch.Tensor  # [B, Hkv, S, D]
    v: torch.Tensor  # [B, Hkv, S, Dv]
    index: torch.Tensor  # [S] sequence index of each key, -1 for empty
    valid: torch.Tensor  # [B, S] False for padding


def bucket(length: int) -> int:
    """Keys a step on a GPU attends over: `length` rounded up to a power of two (at least CHUNK), the extra
    entries masked. The shapes of a decode step then change only when the sequence crosses a power of two,
    so one captured CUDA graph serves every step of a bucket, and a step's result depends only on the
    sequence length, never on how the storage was allocated (grown, preallocated, reused) or its capacity."""
    return max(CHUNK, 1 << (length - 1).bit_length())


class LayerCache:
    """`slack` extra ring entries let speculative decoding write tokens it may take back (truncate) without
    overwriting keys still inside the window.

    `bucketed` (the default on a GPU): full-attention steps attend over `bucket(length)` entries and write by
    index tensor, never by a Python slice, so a decode step can be captured in a CUDA graph and replayed at
    every position of its bucket; and the storage is sequence-major ([S, B, heads, dim]; `k`/`v` are
    [B, heads, S, dim] views of it), so a view of the first n entries has the same strides whatever the
    storage's size: a step reads the same tensors, and rounds alike, on a grown, a preallocated or a reused
    storage. Otherwise (the CPU) the storage is head-major: torch's CPU matmul over sequence-major keys
    took 2.7x (64 keys) to 22x (2048) as long (bf16, 16 heads of 64, one thread)."""

    def __init__(self, attn: AttentionSpec, batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str, slack: int = 0, bucketed: bool | None = None,
                 preallocate: bool = False) -> None:
        self.window = attn.window
        self.capacity = min(max_len, attn.window + slack) if attn.window else max_len  # entries it may hold
        self.bucketed = torch.device(device).type == "cuda" if bucketed is None else bucketed
        # entries the storage may grow to: a whole bucket past the capacity when bucketed
        self.storage_limit = bucket(self.capacity) if self.bucketed and not attn.window else self.capacity
        # a bucketed ring is whole from the start: a step then reads the same keys however the cache was made
        whole = preallocate or (self.bucketed and attn.window)
        size = self.storage_limit if whole else min(self.storage_limit, CHUNK)
        heads, k_dim, v_dim = attn.cache_dims()  # MLA: k holds the latent, v the rotary key
        self.seq_dim = 0 if self.bucketed else 2  # of the storage
        self.keys = torch.zeros(self._shape(size, batch, heads, k_dim), dtype=dtype, device=device)
        self.values = torch.zeros(self._shape(size, batch, heads, v_dim), dtype=dtype, device=device)
        self.index = torch.full((size,), -1, dtype=torch.long, device=device)
        self.valid = torch.zeros(batch, size, dtype=torch.bool, device=device)

    def _shape(self, size: int, batch: int, heads: int, dim: int) -> tuple[int, ...]:
        return (size, batch, heads, dim) if self.seq_dim == 0 else (batch, heads, size, dim)

    @property
    def k(self) -> torch.Tensor:
        """[B, heads, S, dim]"""
        return self.keys.permute(1, 2, 0, 3) if self.seq_dim == 0 else self.keys

    @property
    def v(self) -> torch.Tensor:
        return self.values.permute(1, 2, 0, 3) if self.seq_dim == 0 else self.values

    def reset(self) -> None:
        """Empty again, keeping the storage (a reused cache: its addresses stay those a graph captured)."""
        self.index.fill_(-1)
        self.valid.fill_(False)
        self.keys.zero_()  # masked entries meet the softmax's zeros: stale values must be finite
        self.values.zero_()

    def update(self, k: torch.Tensor, v: torch.Tensor, start: int, index: torch.Tensor,
               valid: torch.Tensor) -> KeysView:
        """Add T new entries (sequence indices start.. as ints, `index` [T] as a tensor) and return the keys they
        may attend to."""
        end = start + k.shape[2]
        if self.window is None:
            if end > self.capacity:
                raise ValueError(f"sequence of {end} tokens exceeds the KV cache of {self.capacity}; "
                                 "allocate the cache for prompt + max_new_tokens")
            n = bucket(end) if self.bucketed else end
            self._grow(n)
            self._write(index if self.bucketed else slice(start, end), k, v, index, valid)
            return KeysView(self.k[:, :, :n], self.v[:, :, :n], self.index[:n], self.valid[:, :n])
        # Ring: new queries need up to window-1 older keys, so attend over ring + new, then keep the newest.
        ring = self.index
        if self.bucketed:  # a graph's warm-up and check run a step twice: what the first wrote is not a key yet
            ring = ring.masked_fill(ring >= index[:1], -1)
        view = KeysView(torch.cat((self.k, k), 2), torch.cat((self.v, v), 2),
                        torch.cat((ring, index)), torch.cat((self.valid, valid), 1))
        self._grow(min(end, self.capacity))  # before the ring first wraps, slot = index
        keep = min(k.shape[2], self.capacity)
        slots = index[-keep:] % self.capacity
        self._write(slots, k[:, :, -keep:], v[:, :, -keep:], index[-keep:], valid[:, -keep:])
        return view

    def _grow(self, needed: int) -> None:
        """Room for `needed` entries: at least double the storage (amortised copies), at most `storage_limit`."""
        size = self.index.numel()
        if needed <= size:
            return
        new = min(self.storage_limit, max(needed, 2 * size))

        def grown(t: torch.Tensor, dim: int, fill) -> torch.Tensor:
            shape = list(t.shape)
            shape[dim] = new - size
            return torch.cat((t, torch.full(shape, fill, dtype=t.dtype, device=t.device)), dim)

        self.keys, self.values = grown(self.keys, self.seq_dim, 0), grown(self.values, self.seq_dim, 0)
        self.index, self.valid = grown(self.index, 0, -1), grown(self.valid, 1, False)

    def truncate(self, length: int) -> None:
        """Forget every entry at sequence index >= length."""
        gone = self.index >= length
        self.index[gone] = -1
        self.valid[:, gone] = False

    def _write(self, slots, k, v, index, valid) -> None:
        if self.seq_dim == 0:
            self.keys[slots] = k.permute(2, 0, 1, 3)
            self.values[slots] = v.permute(2, 0, 1, 3)
        else:
            self.keys[:, :, slots] = k
            self.values[:, :, slots] = v
        self.index[slots] = index
        self.valid[:, slots] = valid

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


class LinearState:
    """A Gated DeltaNet layer's per-sequence state: the conv's last kernel-1 inputs [B, C, K-1] and the recurrent
    state [B, Hv, Dk, Dv] (fp32, as transformers keeps it). A roll-back (`truncate`) cannot subtract tokens from
    a recurrent state, so when `keep` > 0 (speculative decoding) a forward of at most `keep` tokens records the
    state after each of them (`record`), and truncate restores the one it needs."""

    def __init__(self, spec: LinearAttentionSpec, batch: int, dtype: torch.dtype, device: torch.device | str,
                 keep: int = 0) -> None:
        self.conv = torch.zeros(batch, spec.conv_channels, spec.conv_kernel - 1, dtype=dtype, device=device)
        self.state = torch.zeros(batch, spec.num_v_heads, spec.k_head_dim, spec.v_head_dim, dtype=torch.float32,
                                 device=device)
        self.keep = keep
        self.length = 0  # tokens read so far
        # the last forward when recorded: (its start, conv inputs, the state before it and after each token)
        self.history: tuple[int, torch.Tensor, list[torch.Tensor]] | None = None

    def records(self, tokens: int) -> bool:
        return 0 < tokens <= self.keep

    def update(self, conv_window: torch.Tensor, states: list[torch.Tensor]) -> None:
        """After a forward of T tokens: conv_window [B, C, K-1+T] (old conv state + the T new inputs) and the
        recurrent state after each token (`records`) or only after the last."""
        T = conv_window.shape[-1] - self.conv.shape[-1]
        self.history = (self.length, conv_window, [self.state, *states]) if self.records(T) else None
        self.conv, self.state = conv_window[..., T:], states[-1]
        self.length += T

    def truncate(self, length: int) -> None:
        """Back to the state after the first `length` tokens; only within the last recorded forward."""
        if length >= self.length:
            return
        start = self.history[0] if self.history else self.length
        if length < start:
            raise ValueError(f"a linear-attention state cannot roll back to {length} tokens from {self.length}: "
                             "only the last forward of a cache made with slack is recorded")
        _, window, states = self.history
        n = length - start  # tokens of the last forward to keep
        self.conv = window[..., n:n + self.conv.shape[-1]]
        self.state = states[n]
        self.length = length

    def nbytes(self) -> int:
        return self.conv.nbytes + self.state.nbytes


class KVCache:
    """One LayerCache (LinearState for linear attention) per decoder layer, the running sequence length, and per
    MoE layer the router input at each row's newest position when learned prefetch predictors will read it at
    the next token. `slack`: the most tokens a roll-back may take back (speculative verify steps)."""

    def __init__(self, attention_specs: list[AttentionSpec | LinearAttentionSpec], batch: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str, slack: int = 0, preallocate: bool = False,
                 bucketed: bool | None = None) -> None:
        self.layers = [LinearState(a, batch, dtype, device, slack) if isinstance(a, LinearAttentionSpec)
                       else LayerCache(a, batch, max_len, dtype, device, slack, bucketed, preallocate)
                       for a in attention_specs]
        self.batch, self.capacity, self.slack = batch, max_len, slack
        self.length = 0
        self.router_inputs: dict[int, torch.Tensor] = {}  # MoE layer -> [B, H]; a roll-back leaves it: a hint

    def reset(self) -> None:
        """Empty again, keeping every layer's storage (attention layers only: see `LayerCache.reset`)."""
        for layer in self.layers:
            layer.reset()
        self.length = 0
        self.router_inputs.clear()

    def truncate(self, length: int) -> None:
        """Roll back to the first `length` tokens (rejected speculative tokens)."""
        if length >= self.length:  # nothing was written at or past `length`: skip ~3 ops per layer
            return
        for layer in self.layers:
            layer.truncate(length)
        self.length = length

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.layers)
