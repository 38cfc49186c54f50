"""The residency table under every sequence of operations (a Hypothesis state machine, with LRU and
LFU), and the two eviction policies' orders."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from moe_core import ExpertId
from moe_core.offload.policy import EvictionPolicy, LFUPolicy, LRUPolicy
from moe_core.offload.residency import Residency, ResidencyTable

EXPERTS = [ExpertId(layer, e) for layer in (0, 3) for e in range(5)]
experts = st.sampled_from(EXPERTS)


class ResidencyMachine(RuleBasedStateMachine):
    """A model of what must hold (pins, copies in flight) next to the real table."""

    policy_type: type[EvictionPolicy] = LRUPolicy

    def __init__(self) -> None:
        super().__init__()
        self.table = ResidencyTable(1, self.policy_type())
        self.pins: dict[ExpertId, int] = {}
        self.in_flight: set[ExpertId] = set()
        self.acquires = 0

    @initialize(num_slots=st.integers(1, 4))
    def make_table(self, num_slots: int) -> None:
        self.table = ResidencyTable(num_slots, self.policy_type())

    def pinned(self) -> list[ExpertId]:
        return sorted(e for e, n in self.pins.items() if n > 0)

    def evictable(self) -> list[ExpertId]:
        return [e for e in self.table.resident()
                if e not in self.in_flight and not self.pins.get(e)]

    def full(self) -> bool:
        return len(self.table.resident()) == self.table.num_slots

    @rule(expert=experts)
    def acquire(self, expert: ExpertId) -> None:
        was_resident = expert in self.table.resident()
        could_evict = set(self.evictable())
        self.acquires += 1
        if not was_resident and self.full() and not could_evict:
            with pytest.raises(RuntimeError):
                self.table.acquire(expert)
            return
        grant = self.table.acquire(expert)
        assert grant.needs_copy == (not was_resident)
        if grant.evicted is not None:
            assert grant.evicted in could_evict
        self.pins[expert] = self.pins.get(expert, 0) + 1
        if grant.needs_copy:
            self.in_flight.add(expert)

    @precondition(lambda self: self.pinned())
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        expert = data.draw(st.sampled_from(self.pinned()))
        self.table.release(expert)
        self.pins[expert] -= 1

    @rule(expert=experts)
    def reserve(self, expert: ExpertId) -> None:
        was_resident = expert in self.table.resident()
        blocked = self.full() and not self.evictable()
        could_evict = set(self.evictable())
        grant = self.table.reserve(expert)
        if was_resident or blocked:
            assert grant is None
            return
        assert grant is not None and grant.needs_copy
        assert grant.evicted is None or grant.evicted in could_evict
        self.in_flight.add(expert)

    @precondition(lambda self: self.in_flight)
    @rule(data=st.data())
    def mark_ready(self, data: st.DataObject) -> None:
        expert = data.draw(st.sampled_from(sorted(self.in_flight)))
        self.table.mark_ready(expert)
        self.in_flight.discard(expert)

    @precondition(lambda self: any(not self.pins.get(e) for e in self.in_flight))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        expert = data.draw(st.sampled_from(sorted(e for e in self.in_flight
                                                  if not self.pins.get(e))))
        self.table.cancel(expert)
        self.in_flight.discard(expert)
        assert self.table.state(expert) is Residency.ABSENT

    @rule(expert=experts)
    def bad_calls_are_refused(self, expert: ExpertId) -> None:
        if not self.pins.get(expert):
            with pytest.raises(ValueError):
                self.table.release(expert)
        if expert not in self.in_flight:
            with pytest.raises(ValueError):
                self.table.mark_ready(expert)

    @invariant()
    def occupied_within_capacity(self) -> None:
        assert len(self.table.resident()) <= self.table.num_slots

    @invariant()
    def pinned_and_in_flight_stay(self) -> None:
        resident = self.table.resident()
        assert set(self.pinned()) <= resident
        assert self.in_flight <= resident
        for expert in self.in_flight:
            assert self.table.state(expert) is Residency.IN_FLIGHT
        for expert in resident - self.in_flight:
            assert self.table.state(expert) is Residency.READY
        for expert in EXPERTS:
            assert self.table.is_pinned(expert) == bool(self.pins.get(expert))

    @invariant()
    def hits_plus_misses_are_acquires(self) -> None:
        assert self.table.hits + self.table.misses == self.acquires == self.table.accesses

    @invariant()
    def slots_are_injective(self) -> None:
        slots = [self.table.slot_of(e) for e in self.table.resident()]
        assert len(set(slots)) == len(slots)
        assert all(s is not None and 0 <= s < self.table.num_slots for s in slots)


class CheckedLFU(LFUPolicy):
    """LFU whose fast victim choice (a heap over the table's live view) is checked against the
    plain minimum over every candidate."""

    def choose_victim(self, candidates: Iterable[ExpertId]) -> ExpertId:
        victim = super().choose_victim(candidates)
        keys = [(self._counts.get(e, 0), self._last.get(e, 0)) for e in candidates]
        assert (self._counts.get(victim, 0), self._last.get(victim, 0)) == min(keys)
        return victim


class LFUResidencyMachine(ResidencyMachine):
    policy_type = CheckedLFU


TestResidencyLRU = ResidencyMachine.TestCase
TestResidencyLRU.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestResidencyLFU = LFUResidencyMachine.TestCase
TestResidencyLFU.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


A, B, C = ExpertId(0, 0), ExpertId(0, 1), ExpertId(1, 0)


def test_lru_evicts_the_least_recently_used() -> None:
    policy = LRUPolicy()
    for expert in (A, B, C):
        policy.on_insert(expert)
    policy.on_access(A)
    assert policy.choose_victim([A, B, C]) == B
    assert policy.choose_victim([A, C]) == C
    policy.on_evict(C)
    assert policy.choose_victim([A, C]) == A  # C no longer ranked


def test_lfu_evicts_the_least_used_and_breaks_ties_by_recency() -> None:
    policy = LFUPolicy()
    for expert, uses in ((A, 3), (B, 1), (C, 2)):
        for _ in range(uses):
            policy.on_access(expert)
    assert policy.choose_victim([A, B, C]) == B
    policy.on_access(B)  # B: 2 uses, as C, but more recent
    assert policy.choose_victim([A, B, C]) == C
    policy.on_evict(A)
    assert policy.choose_victim([A, B, C]) == C  # counts survive eviction: A still has 3


def test_policies_refuse_an_empty_candidate_list() -> None:
    for policy in (LRUPolicy(), LFUPolicy()):
        with pytest.raises(ValueError):
            policy.choose_victim([])


def test_table_evicts_by_its_policy() -> None:
    table = ResidencyTable(2, LRUPolicy())
    for expert in (A, B):
        table.acquire(expert)
        table.mark_ready(expert)
        table.release(expert)
    table.acquire(A)
    table.release(A)
    grant = table.acquire(C)
    assert grant.evicted == B and table.evictions == 1
    assert (table.hits, table.misses) == (1, 3)
