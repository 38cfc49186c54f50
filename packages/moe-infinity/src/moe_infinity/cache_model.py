"""The simulated GPU expert cache: a fixed number of slots, an eviction policy, and counters.

The rules (the same for every policy, so their numbers compare):
- A layer's experts are used one at a time, in expert order: a miss fetches the expert into a
  slot, evicting the policy's choice when the cache is full (so one slot is enough to run).
- A prefetch fills a free slot or evicts, but never an expert of the layer running now (it is
  being computed while the prefetch copies) or one prefetched in the same round (in flight).
  It is assumed to land before its layer runs: the simulator counts fetches, not time.
"""

from __future__ import annotations

from collections.abc import Collection

from moe_core import EvictionPolicy, ExpertId

from moe_infinity.policies import ActivationAwarePolicy

__all__ = ["ExpertCache"]


class ExpertCache:
    """`num_slots` expert slots managed by `policy`.

    Attributes:
        hits: Uses of a resident expert.
        misses: Uses that fetched the expert on demand.
        prefetches: Prefetch fetches.
        prefetches_used: Prefetched experts used before being evicted.
    """

    def __init__(self, num_slots: int, policy: EvictionPolicy) -> None:
        if num_slots <= 0:
            raise ValueError(f"the cache needs at least one slot, got {num_slots}")
        self.num_slots = num_slots
        self.policy = policy
        self._resident: set[ExpertId] = set()
        self._prefetched: set[ExpertId] = set()  # prefetched and not yet used
        self.hits = 0
        self.misses = 0
        self.prefetches = 0
        self.prefetches_used = 0

    def __contains__(self, expert: ExpertId) -> bool:
        return expert in self._resident

    @property
    def resident(self) -> frozenset[ExpertId]:
        """The experts in the cache."""
        return frozenset(self._resident)

    def access(self, expert: ExpertId) -> bool:
        """Use `expert`; True on a hit."""
        self.policy.on_access(expert)
        if expert in self._resident:
            self.hits += 1
            if expert in self._prefetched:
                self._prefetched.discard(expert)
                self.prefetches_used += 1
            return True
        self.misses += 1
        if len(self._resident) >= self.num_slots:
            self._evict(self.policy.choose_victim(self._resident))
        self._insert(expert)
        return False

    def prefetch(self, expert: ExpertId, protected: Collection[ExpertId]) -> bool:
        """Fetch `expert` ahead of use unless it is resident, or no slot may be taken, or (for an
        activation-aware policy) the victim is predicted to be needed more. True if fetched."""
        if expert in self._resident:
            return False
        if len(self._resident) >= self.num_slots:
            candidates = [e for e in self._resident if e not in protected]
            if not candidates:
                return False
            victim = self.policy.choose_victim(candidates)
            if isinstance(self.policy, ActivationAwarePolicy) \
                    and self.policy.need_of(victim) >= self.policy.need_of(expert):
                return False
            self._evict(victim)
        self._insert(expert)
        self._prefetched.add(expert)
        self.prefetches += 1
        return True

    def _insert(self, expert: ExpertId) -> None:
        self._resident.add(expert)
        self.policy.on_insert(expert)

    def _evict(self, expert: ExpertId) -> None:
        self._resident.discard(expert)
        self._prefetched.discard(expert)
        self.policy.on_evict(expert)
