"""Eviction policies beyond moe-core's LRU and LFU: activation-aware eviction, and Belady's
offline optimum as the ceiling.

Both implement `moe_core.EvictionPolicy` (`on_access`, `on_insert`, `on_evict`, `choose_victim`),
so they plug into moe-core's `ResidencyTable` as well as into the simulator.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Iterable, Sequence

import numpy as np
from moe_core import ExpertId

from moe_infinity.model_shape import ModelShape

__all__ = ["ActivationAwarePolicy", "BeladyPolicy"]


class ActivationAwarePolicy:
    """Evicts the expert the running request is least likely to need soon.

    After MoE-Infinity (arXiv:2401.14361 §5): the engine feeds it the predictor's `[L, E]` need
    (predicted share of each expert, decayed by how many layers away its layer runs next; see
    `RequestPredictor.need`) and the experts in use, through `update`. The victim is, in order:
    not in use (the current layer's experts and prefetches in flight are protected), the lowest
    predicted need, the least recently used (so with no prediction it is LRU).
    """

    def __init__(self, shape: ModelShape) -> None:
        self._row = {layer: row for row, layer in enumerate(shape.moe_layers)}
        self._need = np.zeros((shape.num_moe_layers, shape.num_experts), dtype=np.float32)
        self._in_use: Collection[ExpertId] = frozenset()
        self._last: dict[ExpertId, int] = {}
        self._clock = 0

    def update(self, need: np.ndarray, in_use: Collection[ExpertId] = frozenset()) -> None:
        """The current prediction `need` `[L, E]` and the experts that must stay."""
        if need.shape != self._need.shape:
            raise ValueError(f"need must be {list(self._need.shape)}, got {list(need.shape)}")
        self._need = need
        self._in_use = in_use

    @property
    def need(self) -> np.ndarray:
        """The current prediction `[L, E]` (the last `update`'s; do not modify it)."""
        return self._need

    def need_of(self, expert: ExpertId) -> float:
        """The predicted need of `expert` (its protection ignored)."""
        return float(self._need[self._row[expert.layer], expert.expert])

    def on_access(self, expert: ExpertId) -> None:
        self._clock += 1
        self._last[expert] = self._clock

    def on_insert(self, expert: ExpertId) -> None:
        self._last.setdefault(expert, self._clock)

    def on_evict(self, expert: ExpertId) -> None:
        self._last.pop(expert, None)

    def rank(self, expert: ExpertId) -> tuple[bool, float, int]:
        """The eviction key of `expert`: the smallest is evicted first."""
        return expert in self._in_use, self.need_of(expert), self._last.get(expert, 0)

    def choose_victim(self, candidates: Iterable[ExpertId]) -> ExpertId:
        allowed = list(candidates)
        if not allowed:
            raise ValueError("no eviction candidate")
        return min(allowed, key=self.rank)


class BeladyPolicy:
    """Belady's MIN (1966): evict the expert whose next use is farthest in the future.

    An offline policy: it is given the whole access string up front, and each `on_access` must
    be the next access of that string. With one fetch per miss and no bypass it needs the
    fewest fetches of any policy (prefetching ones included), so it is the ceiling of every
    demand policy's hit rate. Ties (experts never used again, or used at the same time) go to
    the lowest (layer, expert), for determinism.
    """

    def __init__(self, accesses: Sequence[ExpertId]) -> None:
        self._uses: dict[ExpertId, deque[int]] = {}
        for t, expert in enumerate(accesses):
            self._uses.setdefault(expert, deque()).append(t)
        self._clock = 0
        self._length = len(accesses)

    def on_access(self, expert: ExpertId) -> None:
        uses = self._uses.get(expert)
        if not uses or uses[0] != self._clock:
            raise ValueError(f"access {self._clock} is {expert}, which the access string "
                             "given to BeladyPolicy does not have there")
        uses.popleft()
        self._clock += 1

    def on_insert(self, expert: ExpertId) -> None:
        pass

    def on_evict(self, expert: ExpertId) -> None:
        pass

    def next_use(self, expert: ExpertId) -> int:
        """The access index at which `expert` is next used (past the end: never again)."""
        uses = self._uses.get(expert)
        return uses[0] if uses else self._length

    def choose_victim(self, candidates: Iterable[ExpertId]) -> ExpertId:
        allowed = list(candidates)
        if not allowed:
            raise ValueError("no eviction candidate")
        return max(allowed, key=lambda e: (self.next_use(e), -e.layer, -e.expert))
