"""Eviction policies: which resident expert leaves when a slot is needed.

A policy only ranks; the residency table enforces the rules (in-use and in-flight experts are
never offered as victims). moe-infinity plugs its activation-aware policy in through this
protocol.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

from moe_core.expert_id import ExpertId

__all__ = ["EvictionPolicy", "LFUPolicy", "LRUPolicy"]


@runtime_checkable
class EvictionPolicy(Protocol):
    """Ranks resident experts for eviction."""

    def on_access(self, expert: ExpertId) -> None:
        """`expert` was used (a hit, or a miss about to be filled)."""
        ...

    def on_insert(self, expert: ExpertId) -> None:
        """`expert` now occupies a slot."""
        ...

    def on_evict(self, expert: ExpertId) -> None:
        """`expert` left its slot."""
        ...

    def choose_victim(self, candidates: Iterable[ExpertId]) -> ExpertId:
        """The expert to evict among `candidates` (resident, not in use, not in flight)."""
        ...


class LRUPolicy:
    """Least recently used first."""

    def __init__(self) -> None:
        self._order: OrderedDict[ExpertId, None] = OrderedDict()

    def on_access(self, expert: ExpertId) -> None:
        self._order.pop(expert, None)
        self._order[expert] = None

    def on_insert(self, expert: ExpertId) -> None:
        self.on_access(expert)

    def on_evict(self, expert: ExpertId) -> None:
        self._order.pop(expert, None)

    def choose_victim(self, candidates: Iterable[ExpertId]) -> ExpertId:
        allowed = set(candidates)
        for expert in self._order:
            if expert in allowed:
                return expert
        raise ValueError("no eviction candidate")


class LFUPolicy:
    """Least frequently used first (counts survive eviction); ties go to the least recent."""

    def __init__(self) -> None:
        self._counts: dict[ExpertId, int] = {}
        self._last: dict[ExpertId, int] = {}
        self._clock = 0

    def on_access(self, expert: ExpertId) -> None:
        self._clock += 1
        self._counts[expert] = self._counts.get(expert, 0) + 1
        self._last[expert] = self._clock

    def on_insert(self, expert: ExpertId) -> None:
        self._last.setdefault(expert, self._clock)

    def on_evict(self, expert: ExpertId) -> None:
        pass

    def choose_victim(self, candidates: Iterable[ExpertId]) -> ExpertId:
        allowed = list(candidates)
        if not allowed:
            raise ValueError("no eviction candidate")
        return min(allowed, key=lambda e: (self._counts.get(e, 0), self._last.get(e, 0)))
