"""Device slots of one MoE layer: which expert each slot holds, and which to replace on a miss.

Pure bookkeeping (no tensors), driven by an EvictionPolicy; the provider does the copies. Invariants
(property-tested): at most `capacity` residents, an expert in use is never evicted, every resident
expert has exactly one slot.
"""
from __future__ import annotations

from collections.abc import Collection, Sequence

from .policies import EvictionPolicy


class LayerSlots:
    def __init__(self, capacity: int, policy: EvictionPolicy, holds: Sequence[int | None] = ()) -> None:
        """`holds`: the distinct expert each slot already holds (None: free); default all free."""
        if capacity < 1:
            raise ValueError(f"an offloaded MoE layer needs at least 1 expert slot, got {capacity}")
        self.capacity = capacity
        self.policy = policy
        held = list(holds) or [None] * capacity
        self.slot_of: dict[int, int] = {e: slot for slot, e in enumerate(held) if e is not None}
        self.free = [slot for slot, e in enumerate(held) if e is None]
        self.step = 0
        for expert in self.slot_of:
            policy.on_insert(expert)

    def observe(self, experts: Sequence[int], weights: Sequence[float]) -> None:
        """A new router decision of this layer (best expert first)."""
        self.step += 1
        self.policy.observe_routing(self.step, experts, weights)

    def access(self, expert: int) -> None:
        self.policy.on_access(expert, self.step)

    def admit(self, expert: int, protected: Collection[int]) -> tuple[int, int | None] | None:
        """Give `expert` a slot: (slot, evicted expert or None), or None when every resident is protected."""
        if self.free:
            slot, victim = self.free.pop(), None
        else:
            candidates = [e for e in self.slot_of if e not in protected]
            if not candidates:
                return None
            victim = self.policy.choose_victim(candidates)
            slot = self.evict(victim)
        self.slot_of[expert] = slot
        self.policy.on_insert(expert)
        return slot, victim

    def evict(self, expert: int) -> int:
        slot = self.slot_of.pop(expert)
        self.policy.on_evict(expert)
        return slot

    def drop(self, expert: int) -> None:
        """Forget a resident whose copy failed: its slot is free again."""
        self.free.append(self.evict(expert))
