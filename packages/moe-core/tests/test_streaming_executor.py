"""The streaming executor's copies: one per chunk of consecutive experts, and its shared tickets
released once, only after every expert of the chunk was computed (the ring-safety rule).

The example tests of its outputs against the resident experts are in test_offload_executors.py;
here a layer's executor is called directly on random routings and compared bit for bit with the
same executor holding every expert resident (no copies at all; the products, grouped or not, are
per-expert loops on the CPU, so any grouping gives the same bits).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import pairwise
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from moe_core import ExpertId, load_model, tiny_model_path
from moe_core.offload import streaming_executor
from moe_core.offload.copy_engine import CopyLane, CopyTicket, CpuCopyEngine
from moe_core.offload.gpu_slots import GpuSlotPool
from moe_core.offload.host_store import HostExpertStore
from moe_core.offload.stall_timer import StallTimer
from moe_core.offload.stats import OffloadStats
from moe_core.offload.streaming_executor import ExpertRing, StreamingExecutor

TOP_K = 2


@dataclass
class Copy:
    ticket: CopyTicket
    slots: range

    @property
    def experts(self) -> tuple[ExpertId, ...]:
        """What the ring's copy carries (its key)."""
        assert isinstance(self.ticket.key, tuple)
        return self.ticket.key


@dataclass
class Read:
    slots: range


@dataclass
class Release:
    tickets: tuple[CopyTicket, ...]


Event = Copy | Read | Release


class RecordingEngine(CpuCopyEngine):
    """The CPU engine, logging each copy and release (and, through `reading`, each grouped
    product's slots) in one order."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[Event] = []
        self.pool: GpuSlotPool | None = None

    def submit(self, src: torch.Tensor, dst: torch.Tensor, lane: CopyLane,
               key: object = None) -> CopyTicket:
        ticket = super().submit(src, dst, lane, key)
        rows = dst.shape[0] if dst.dim() == 2 else 1
        self.events.append(Copy(ticket, self.slots(dst, rows)))
        return ticket

    def release(self, *tickets: CopyTicket) -> None:
        self.events.append(Release(tickets))

    def slots(self, view: torch.Tensor, count: int) -> range:
        assert self.pool is not None
        first = (view.data_ptr() - self.pool.storage.data_ptr()) // self.pool.layout.nbytes
        return range(first, first + count)

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Log the slots each grouped product reads (its weights are views of the pool)."""
        product = streaming_executor.grouped_expert_mlp

        def spy(x: torch.Tensor, gate_up: torch.Tensor, *args: object) -> None:
            self.events.append(Read(self.slots(gate_up, gate_up.shape[0])))
            product(x, gate_up, *args)  # type: ignore[arg-type]

        with mock.patch.object(streaming_executor, "grouped_expert_mlp", spy):
            yield

    def copies(self) -> list[Copy]:
        return [e for e in self.events if isinstance(e, Copy)]


def assert_ring_safe(events: list[Event], ring: range) -> None:
    """The rule `release` serves on CUDA: a ticket is released at most once, never before a read
    of a slot it filled, and before any later copy into a slot read under it; every ticket
    whose slots were read is released in the end."""
    owner: dict[int, CopyTicket] = {}  # ring slot -> the copy that last filled it
    read: set[int] = set()  # ring slots read since they were filled
    released: set[CopyTicket] = set()
    owed: set[CopyTicket] = set()  # read, not yet released
    for event in events:
        if isinstance(event, Copy):
            for slot in set(event.slots) & set(ring):
                before = owner.get(slot)
                assert not (slot in read and before in owed), \
                    f"slot {slot} refilled while {before.key} was read and not released"
                owner[slot] = event.ticket
                read.discard(slot)
        elif isinstance(event, Read):
            for slot in set(event.slots) & set(ring):
                assert owner[slot] not in released, \
                    f"{owner[slot].key} released before slot {slot} was computed"
                read.add(slot)
                owed.add(owner[slot])
        else:
            for ticket in event.tickets:
                assert ticket not in released, f"{ticket.key} released twice"
                released.add(ticket)
                owed.discard(ticket)
    assert not owed, f"never released: {[t.key for t in owed]}"


@pytest.fixture(scope="module")
def store() -> HostExpertStore:
    return HostExpertStore.from_model(load_model(tiny_model_path(), dtype="float32"), pin=False)


@pytest.fixture(scope="module")
def all_resident(store: HostExpertStore) -> dict[int, StreamingExecutor]:
    """Every expert resident: the outputs without a single streamed copy."""
    return executors(store, store.experts(), ring_size=2, share=None, max_group=8)[1]


def executors(store: HostExpertStore, resident: list[ExpertId], ring_size: int,
              share: float | None, max_group: int
              ) -> tuple[RecordingEngine, dict[int, StreamingExecutor]]:
    engine = RecordingEngine()
    engine.pool = GpuSlotPool(store.layout, len(resident) + ring_size, device="cpu")
    ring = ExpertRing(store, engine.pool, engine, OffloadStats(), StallTimer(torch.device("cpu")),
                      resident, ring_size, share, max_group)
    return engine, {layer: StreamingExecutor(ring, layer) for layer in store.moe_layers}


Call = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def after(expert: ExpertId) -> ExpertId:
    return ExpertId(expert.layer, expert.expert + 1)


def routing(store: HostExpertStore, tokens: int, allowed: list[int], seed: int) -> Call:
    """`tokens` random inputs `[T, D]`, each routed to TOP_K distinct experts of `allowed`."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, store.layout.hidden_size, generator=g)  # [T, D]
    picks = torch.rand(tokens, len(allowed), generator=g).argsort(dim=1)[:, :TOP_K]  # [T, K]
    ids = torch.tensor(allowed)[picks]
    return hidden, ids, torch.rand(tokens, TOP_K, generator=g)


def run_steps(store: HostExpertStore, calls: Callable[[int, int], Call],
              streaming: dict[int, StreamingExecutor],
              reference: dict[int, StreamingExecutor], steps: int) -> None:
    """`steps` passes over the layers in order; each call's output equals the reference's."""
    for step in range(steps):
        for layer in store.moe_layers:
            call = calls(step, layer)
            assert torch.equal(streaming[layer](*call), reference[layer](*call))


def test_consecutive_streamed_experts_cross_in_a_handful_of_copies(
        store: HostExpertStore, all_resident: dict[int, StreamingExecutor]) -> None:
    """A ring of 8 and 16 streamed experts per layer, all used: each layer's 16 cross in two
    copies of 8 (after the first layer, one of them issued ahead by the layer before), and the
    last layer's lookahead in one more, not one copy per expert."""
    engine, streaming = executors(store, [], ring_size=8, share=0.5, max_group=8)
    every = list(range(store.num_experts))
    with engine.reading():
        run_steps(store, lambda step, layer: routing(store, 64, every, layer), streaming,
                  all_resident, steps=1)
    layers = len(store.moe_layers)
    copies = engine.copies()
    assert sum(len(c.slots) for c in copies) == store.num_experts * layers + 8  # + next pass's
    assert len(copies) == 2 * layers + 1
    ring = streaming[store.moe_layers[0]].ring
    assert ring.stats.bytes_copied == (store.num_experts * layers + 8) * store.layout.nbytes
    assert ring.stats.prefetches_issued == 8 * layers
    assert_ring_safe(engine.events, range(0, 8))


def test_chunks_split_at_the_ring_end_and_at_residents(
        store: HostExpertStore, all_resident: dict[int, StreamingExecutor]) -> None:
    """Residents 3, 4 and 9 of every layer split its streamed experts into runs of consecutive
    ids, and a ring of 5 wraps inside them: no copy crosses a gap or the ring's end, and the
    outputs stay exact."""
    resident = [ExpertId(layer, e) for layer in store.moe_layers for e in (3, 4, 9)]
    engine, streaming = executors(store, resident, ring_size=5, share=None, max_group=8)
    every = list(range(store.num_experts))
    with engine.reading():
        run_steps(store, lambda step, layer: routing(store, 48, every, 10 * step + layer),
                  streaming, all_resident, steps=2)
    ring = range(len(resident), len(resident) + 5)
    streamed = [c for c in engine.copies() if c.slots[0] in ring]
    assert any(len(c.slots) > 1 for c in streamed)
    wraps = [(a, b) for a, b in pairwise(streamed) if a.slots[-1] == ring[-1]
             and b.slots[0] == ring[0] and b.experts[0] == after(a.experts[-1])]
    assert wraps  # 13 streamed experts a layer: a call's first 5 copies start mid-ring
    for c in streamed:
        assert set(c.slots) <= set(ring) and len(c.experts) == len(c.slots)
        assert all(b == after(a) for a, b in pairwise(c.experts))
        assert not {3, 4, 9} & {x.expert for x in c.experts}
    assert len(streamed) < sum(len(c.slots) for c in streamed)
    assert_ring_safe(engine.events, ring)


def test_a_chunk_spanning_runs_is_released_once_after_its_last_computed_expert(
        store: HostExpertStore, all_resident: dict[int, StreamingExecutor]) -> None:
    """Resident 3 has no tokens, so it splits the copies ([0, 1, 2], [4, 5, 6, 7], ...) but not
    the runs of 4 ([0, 1, 2, 4], [5, 6, 7, 8], ...): chunk [4-7] is computed by two runs, and its
    ticket is released once, after the second, with none of its slots refilled before."""
    layer = store.moe_layers[0]
    engine, streaming = executors(store, [ExpertId(layer, 3)], ring_size=8, share=None,
                                  max_group=4)
    allowed = [e for e in range(store.num_experts) if e != 3]
    call = routing(store, 64, allowed, seed=0)
    with engine.reading():
        assert torch.equal(streaming[layer](*call), all_resident[layer](*call))
    chunk = next(c for c in engine.copies()
                 if c.experts == tuple(ExpertId(layer, e) for e in (4, 5, 6, 7)))
    after = engine.events[engine.events.index(chunk):]
    refill = next(i for i, e in enumerate(after) if isinstance(e, Copy) and i > 0
                  and set(e.slots) & set(chunk.slots))
    after = after[:refill]  # while the chunk's experts are in their slots
    reads = [i for i, e in enumerate(after) if isinstance(e, Read) and set(e.slots) & set(
        chunk.slots)]
    releases = [i for i, e in enumerate(after) if isinstance(e, Release)
                and chunk.ticket in e.tickets]
    assert len(reads) == 2 and len(releases) == 1 and releases[0] > reads[1]
    assert_ring_safe(engine.events, range(1, 9))


def test_a_shard_store_copies_its_consecutive_rows_at_once(store: HostExpertStore) -> None:
    """In a shard, experts 1, 4 and 5 sit in consecutive rows: one copy, each slot holding its
    own expert's block."""
    layer = store.moe_layers[0]
    shard = store.subset([ExpertId(layer, e) for e in (1, 4, 5, 7)])
    engine, streaming = executors(shard, [], ring_size=3, share=None, max_group=8)
    ring = streaming[layer].ring
    flights = ring.stream([ExpertId(layer, e) for e in (1, 4, 5)])
    assert len({id(f.ticket) for f in flights}) == 1 and len(engine.copies()) == 1
    engine.drain()
    for flight in flights:
        assert torch.equal(ring.pool.slot(flight.slot), shard.block(flight.expert))


@settings(max_examples=40, deadline=None)
@given(resident_ids=st.lists(st.sets(st.integers(0, 15), max_size=8), min_size=6, max_size=6),
       ring_size=st.integers(2, 8), max_group=st.integers(1, 8),
       share=st.sampled_from([None, 0.0, 0.5]), seed=st.integers(0, 2**16),
       widths=st.lists(st.integers(TOP_K, 16), min_size=1, max_size=12))
def test_any_ring_equals_the_resident_experts_bit_for_bit_and_is_ring_safe(
        store: HostExpertStore, all_resident: dict[int, StreamingExecutor],
        resident_ids: list[set[int]], ring_size: int, max_group: int, share: float | None,
        seed: int, widths: list[int]) -> None:
    """Random residents per layer, ring sizes 2-8, runs of 1-8, lookahead never, always or for
    large calls; each call routes to a random subset of the experts (some calls use nearly all,
    others few, so guesses copied ahead are partly skipped and chunks span runs)."""
    layers = store.moe_layers
    resident = [ExpertId(layer, e) for layer, ids in zip(layers, resident_ids, strict=True)
                for e in sorted(ids)]
    engine, streaming = executors(store, resident, ring_size, share, max_group)

    def call(step: int, layer: int) -> Call:
        index = step * len(layers) + layer
        g = torch.Generator().manual_seed(seed + index)
        allowed = torch.randperm(store.num_experts, generator=g)[: widths[index % len(widths)]]
        return routing(store, 24, sorted(allowed.tolist()), seed + index)

    with engine.reading():
        run_steps(store, call, streaming, all_resident, steps=2)
    assert_ring_safe(engine.events, range(len(resident), len(resident) + ring_size))
    stats = streaming[layers[0]].ring.stats
    copied = sum(len(c.slots) for c in engine.copies())
    assert stats.bytes_copied == copied * store.layout.nbytes
