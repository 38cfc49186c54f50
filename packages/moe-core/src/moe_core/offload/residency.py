"""The residency table: which expert is in which GPU slot, which slots are being filled, which
experts are in use, and the hit/miss counters.

Rules it enforces whatever the policy says: the number of occupied slots never exceeds the pool;
an expert in use (acquired and not yet released) or in flight (its copy not yet complete) is
never evicted.
"""

from __future__ import annotations

from collections.abc import Iterator, Set
from dataclasses import dataclass
from enum import Enum

from moe_core.expert_id import ExpertId
from moe_core.offload.policy import EvictionPolicy

__all__ = ["Evictable", "Residency", "ResidencyTable", "SlotGrant"]


class Residency(Enum):
    """Where an expert stands."""

    ABSENT = "absent"
    IN_FLIGHT = "in_flight"
    READY = "ready"


@dataclass(frozen=True)
class SlotGrant:
    """The answer to `acquire`: the slot to read, and whether a copy must fill it first.

    Attributes:
        slot: Slot index in the pool.
        needs_copy: The caller must copy the expert in and then call `mark_ready`.
        evicted: The expert whose slot was taken, if any.
    """

    slot: int
    needs_copy: bool
    evicted: ExpertId | None = None


class Evictable(Set[ExpertId]):
    """The experts that may be evicted now (ready, not in use) as a live view of a table:
    membership is O(1) and iteration lazy, so a policy that walks its own order (LRU) finds a
    victim without the table listing every slot first."""

    def __init__(self, table: ResidencyTable) -> None:
        self._table = table

    def __contains__(self, expert: object) -> bool:
        table = self._table
        return (table._state.get(expert) is Residency.READY  # type: ignore[call-overload]
                and not table._pins.get(expert))  # type: ignore[call-overload]

    def __iter__(self) -> Iterator[ExpertId]:
        return (e for e in self._table._state if e in self)

    def __len__(self) -> int:
        return sum(1 for _ in self)


class ResidencyTable:
    """Expert-to-slot map of a pool of `num_slots` equal slots, with an eviction policy."""

    def __init__(self, num_slots: int, policy: EvictionPolicy) -> None:
        if num_slots <= 0:
            raise ValueError(f"ResidencyTable needs at least one slot, got {num_slots}")
        self.num_slots = num_slots
        self.policy = policy
        self._slot_of: dict[ExpertId, int] = {}
        self._state: dict[ExpertId, Residency] = {}
        self._pins: dict[ExpertId, int] = {}
        self._free = list(range(num_slots - 1, -1, -1))
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    # Queries --------------------------------------------------------------------------------

    def state(self, expert: ExpertId) -> Residency:
        """`ABSENT`, `IN_FLIGHT` or `READY`."""
        return self._state.get(expert, Residency.ABSENT)

    def slot_of(self, expert: ExpertId) -> int | None:
        """The slot holding (or being filled with) `expert`."""
        return self._slot_of.get(expert)

    def resident(self) -> set[ExpertId]:
        """Experts holding a slot (ready or in flight)."""
        return set(self._slot_of)

    def is_pinned(self, expert: ExpertId) -> bool:
        """Whether `expert` is in use."""
        return self._pins.get(expert, 0) > 0

    @property
    def accesses(self) -> int:
        """`acquire` calls so far (`hits + misses`)."""
        return self.hits + self.misses

    # Changes --------------------------------------------------------------------------------

    def acquire(self, expert: ExpertId) -> SlotGrant:
        """Pin `expert` for use, taking a slot (and evicting) on a miss.

        A hit is an expert already ready or in flight. Raises `RuntimeError` when every slot is
        pinned or in flight, so no slot can be taken.
        """
        self.policy.on_access(expert)
        slot = self._slot_of.get(expert)
        if slot is not None:
            self.hits += 1
            self._pins[expert] = self._pins.get(expert, 0) + 1
            return SlotGrant(slot, needs_copy=False)
        self.misses += 1
        slot, evicted = self._take_slot()
        if slot is None:
            raise RuntimeError("every GPU slot is in use or in flight; the pool is too small "
                               "for one layer's active experts")
        self._occupy(expert, slot)
        self._pins[expert] = 1
        return SlotGrant(slot, needs_copy=True, evicted=evicted)

    def touch(self, expert: ExpertId) -> None:
        """A use of a resident expert served without pinning it (its compute was already
        enqueued and its slot fenced): counts a hit and tells the policy.

        Raises:
            KeyError: `expert` holds no slot.
        """
        if expert not in self._slot_of:
            raise KeyError(f"{expert} holds no slot")
        self.policy.on_access(expert)
        self.hits += 1

    def reserve(self, expert: ExpertId) -> SlotGrant | None:
        """Take a slot for a prefetch of `expert` without pinning it; None when it is already
        resident or no slot can be freed. The caller copies, then calls `mark_ready` (or
        `cancel`)."""
        if expert in self._slot_of:
            return None
        slot, evicted = self._take_slot()
        if slot is None:
            return None
        self._occupy(expert, slot)
        return SlotGrant(slot, needs_copy=True, evicted=evicted)

    def mark_ready(self, expert: ExpertId) -> None:
        """The copy into `expert`'s slot has completed."""
        if self._state.get(expert) is not Residency.IN_FLIGHT:
            raise ValueError(f"{expert} is not in flight")
        self._state[expert] = Residency.READY

    def cancel(self, expert: ExpertId) -> None:
        """Abandon an in-flight prefetch of an unpinned expert and free its slot."""
        if self._state.get(expert) is not Residency.IN_FLIGHT or self.is_pinned(expert):
            raise ValueError(f"{expert} is not an unpinned expert in flight")
        self._free.append(self._remove(expert))  # the slot is free again

    def release(self, expert: ExpertId) -> None:
        """Unpin `expert` after use."""
        pins = self._pins.get(expert, 0)
        if pins <= 0:
            raise ValueError(f"{expert} is not in use")
        self._pins[expert] = pins - 1

    # Internals ------------------------------------------------------------------------------

    def _occupy(self, expert: ExpertId, slot: int) -> None:
        self._slot_of[expert] = slot
        self._state[expert] = Residency.IN_FLIGHT
        self.policy.on_insert(expert)

    def _remove(self, expert: ExpertId) -> int:
        slot = self._slot_of.pop(expert)
        del self._state[expert]
        self._pins.pop(expert, None)
        self.policy.on_evict(expert)
        return slot

    def _take_slot(self) -> tuple[int | None, ExpertId | None]:
        if self._free:
            return self._free.pop(), None
        candidates = Evictable(self)
        if next(iter(candidates), None) is None:
            return None, None
        victim = self.policy.choose_victim(candidates)
        if victim not in candidates:
            raise RuntimeError(f"policy chose {victim}, which may not be evicted")
        self.evictions += 1
        return self._remove(victim), victim
