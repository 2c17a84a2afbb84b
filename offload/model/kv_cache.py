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


class LayerCache:
    """`slack` extra ring entries let speculative decoding write tokens it may take back (truncate) without
    overwriting keys still inside the window."""

    def __init__(self, attn: AttentionSpec, batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str, slack: int = 0) -> None:
        self.window = attn.window
        self.capacity = min(max_len, attn.window + slack) if attn.window else max_len  # entries it may hold
        size = min(self.capacity, CHUNK)
        heads, k_dim, v_dim = attn.cache_dims()  # MLA: k holds the latent, v the rotary key
        self.k = torch.zeros(batch, heads, size, k_dim, dtype=dtype, device=device)
        self.v = torch.zeros(batch, heads, size, v_dim, dtype=dtype, device=device)
        self.index = torch.full((size,), -1, dtype=torch.long, device=device)
        self.valid = torch.zeros(batch, size, dtype=torch.bool, device=device)

    def update(self, k: torch.Tensor, v: torch.Tensor, start: int, index: torch.Tensor,
               valid: torch.Tensor) -> KeysView:
        """Add T new entries (sequence indices start.. as ints, `index` [T] as a tensor) and return the keys they
        may attend to."""
        end = start + k.shape[2]
        if self.window is None:
            if end > self.capacity:
                raise ValueError(f"sequence of {end} tokens exceeds the KV cache of {self.capacity}; "
                                 "allocate the cache for prompt + max_new_tokens")
            self._grow(end)
            self._write(slice(start, end), k, v, index, valid)
            return KeysView(self.k[:, :, :end], self.v[:, :, :end], self.index[:end], self.valid[:, :end])
        # Ring: new queries need up to window-1 older keys, so attend over ring + new, then keep the newest.
        view = KeysView(torch.cat((self.k, k), 2), torch.cat((self.v, v), 2),
                        torch.cat((self.index, index)), torch.cat((self.valid, valid), 1))
        self._grow(min(end, self.capacity))  # before the ring first wraps, slot = index
        keep = min(k.shape[2], self.capacity)
        slots = index[-keep:] % self.capacity
        self._write(slots, k[:, :, -keep:], v[:, :, -keep:], index[-keep:], valid[:, -keep:])
        return view

    def _grow(self, needed: int) -> None:
        """Room for `needed` entries: at least double the storage (amortised copies), at most `capacity`."""
        size = self.index.numel()
        if needed <= size:
            return
        new = min(self.capacity, max(needed, 2 * size))

        def grown(t: torch.Tensor, dim: int, fill) -> torch.Tensor:
            shape = list(t.shape)
            shape[dim] = new - size
            return torch.cat((t, torch.full(shape, fill, dtype=t.dtype, device=t.device)), dim)

        self.k, self.v = grown(self.k, 2, 0), grown(self.v, 2, 0)
        self.index, self.valid = grown(self.index, 0, -1), grown(self.valid, 1, False)

    def truncate(self, length: int) -> None:
        """Forget every entry at sequence index >= length."""
        gone = self.index >= length
        self.index[gone] = -1
        self.valid[:, gone] = False

    def _write(self, slots, k, v, index, valid) -> None:
        self.k[:, :, slots] = k
        self.v[:, :, slots] = v
        self.index[slots] = index
        self.valid[:, slots] = valid


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
                 dtype: torch.dtype, device: torch.device | str, slack: int = 0) -> None:
        self.layers = [LinearState(a, batch, dtype, device, slack) if isinstance(a, LinearAttentionSpec)
                       else LayerCache(a, batch, max_len, dtype, device, slack) for a in attention_specs]
        self.length = 0
        self.router_inputs: dict[int, torch.Tensor] = {}  # MoE layer -> [B, H]; a roll-back leaves it: a hint

    def truncate(self, length: int) -> None:
        """Roll back to the first `length` tokens (rejected speculative tokens)."""
        if length >= self.length:  # nothing was written at or past `length`: skip ~3 ops per layer
            return
        for layer in self.layers:
            layer.truncate(length)
        self.length = length

    def nbytes(self) -> int:
        return sum(c.nbytes() if isinstance(c, LinearState) else c.k.nbytes + c.v.nbytes for c in self.layers)
