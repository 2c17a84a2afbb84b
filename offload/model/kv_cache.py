"""Preallocated KV cache. Full-attention layers keep every position; sliding-window layers keep a ring of
exactly `window` entries, so their memory is constant in sequence length.

Every cache entry records the sequence index it holds (-1 = empty) and, per batch row, whether it is a
real token (left padding is not), so attention masks come from the cache itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..spec import AttentionSpec


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
        capacity = min(max_len, attn.window + slack) if attn.window else max_len
        self.k = torch.zeros(batch, attn.num_kv_heads, capacity, attn.head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(batch, attn.num_kv_heads, capacity, attn.v_head_dim, dtype=dtype, device=device)
        self.index = torch.full((capacity,), -1, dtype=torch.long, device=device)
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)

    @property
    def capacity(self) -> int:
        return self.index.numel()

    def update(self, k: torch.Tensor, v: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> KeysView:
        """Add T new entries (sequence indices `index` [T], consecutive) and return the keys they may attend to."""
        if self.window is None:
            end = int(index[-1]) + 1
            if end > self.capacity:
                raise ValueError(f"sequence of {end} tokens exceeds the KV cache of {self.capacity}; "
                                 "allocate the cache for prompt + max_new_tokens")
            self._write(slice(int(index[0]), end), k, v, index, valid)
            return KeysView(self.k[:, :, :end], self.v[:, :, :end], self.index[:end], self.valid[:, :end])
        # Ring: new queries need up to window-1 older keys, so attend over ring + new, then keep the newest.
        view = KeysView(torch.cat((self.k, k), 2), torch.cat((self.v, v), 2),
                        torch.cat((self.index, index)), torch.cat((self.valid, valid), 1))
        keep = min(k.shape[2], self.capacity)
        slots = index[-keep:] % self.capacity
        self._write(slots, k[:, :, -keep:], v[:, :, -keep:], index[-keep:], valid[:, -keep:])
        return view

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


class KVCache:
    """One LayerCache per decoder layer, the running sequence length, and per MoE layer the router input at
    each row's newest position when learned prefetch predictors will read it at the next token."""

    def __init__(self, attention_specs: list[AttentionSpec], batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str, slack: int = 0) -> None:
        self.layers = [LayerCache(a, batch, max_len, dtype, device, slack) for a in attention_specs]
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
        return sum(t.numel() * t.element_size() for c in self.layers for t in (c.k, c.v))
