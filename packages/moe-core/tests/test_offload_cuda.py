"""The CUDA copy engine and the pinned store on a GPU (marked `gpu`; skipped without CUDA)."""

from __future__ import annotations

import gc

import pytest
import torch
from moe_core import ExpertId, tiny_model_path
from moe_core.offload.copy_engine import CopyEngine, CopyLane
from moe_core.offload.copy_engines import make_copy_engine
from moe_core.offload.gpu_slots import GpuSlotPool
from moe_core.offload.host_store import HostExpertStore
from moe_core.offload.layout import ExpertLayout

pytestmark = pytest.mark.gpu

BIG = ExpertLayout(hidden_size=4096, intermediate_size=2048, dtype=torch.bfloat16)  # 48 MiB


@pytest.fixture(scope="module")
def cupy():  # type: ignore[no-untyped-def]
    return pytest.importorskip("cupy")


@pytest.fixture()
def engine(cupy):  # type: ignore[no-untyped-def]
    from moe_core.offload.cuda_copy_engine import CudaCopyEngine

    engine = CudaCopyEngine("cuda", prefetch_window=1)
    yield engine
    engine.close()


def pinned_sources(n: int, layout: ExpertLayout = BIG) -> HostExpertStore:
    store = HostExpertStore.empty(layout, [0], num_experts=n, pin=True)
    for e in range(n):
        store.block(ExpertId(0, e)).copy_(torch.arange(layout.numel) % 251 + e)
    return store


def poisoned_pool(n: int, layout: ExpertLayout = BIG) -> GpuSlotPool:
    pool = GpuSlotPool(layout, n, device="cuda")
    pool.storage.fill_(float("nan"))
    torch.cuda.synchronize()  # the copy streams do not wait for the fill on the current stream
    return pool


def test_pinned_store_is_pinned_and_matches_the_unpinned_one() -> None:
    pinned = HostExpertStore.from_checkpoint(tiny_model_path())
    assert pinned.is_pinned
    pageable = HostExpertStore.from_checkpoint(tiny_model_path(), pin=False)
    assert not pageable.is_pinned
    assert all(torch.equal(pinned.block(e), pageable.block(e)) for e in pinned.experts())


def test_factory_gives_the_cuda_engine(cupy) -> None:  # type: ignore[no-untyped-def]
    from moe_core.offload.cuda_copy_engine import CudaCopyEngine

    engine = make_copy_engine("cuda")
    assert isinstance(engine, CudaCopyEngine) and isinstance(engine, CopyEngine)


def test_copies_land_and_the_current_stream_waits_for_them(engine) -> None:  # type: ignore[no-untyped-def]
    store, pool = pinned_sources(6), poisoned_pool(6)
    lanes = [CopyLane.PREFETCH, CopyLane.DEMAND] * 3
    tickets = [engine.submit(store.block(ExpertId(0, e)), pool.slot(e), lane, key=e)
               for e, lane in enumerate(lanes)]
    for ticket in tickets:
        engine.wait(ticket)
    # No host synchronisation: the clone runs on the current stream, after the waited events.
    got = [pool.slot(e).clone() for e in range(6)]
    for e in range(6):
        assert torch.equal(got[e].cpu(), store.block(ExpertId(0, e)))
    engine.drain()
    assert engine.bytes_copied == 6 * BIG.nbytes
    assert engine.copy_seconds > 0
    assert all(engine.is_complete(t) and t.done for t in tickets)


def test_demand_overtakes_queued_prefetches(engine, cupy) -> None:  # type: ignore[no-untyped-def]
    store, pool = pinned_sources(8), poisoned_pool(8)
    alone = engine.submit(store.block(ExpertId(0, 7)), pool.slot(7), CopyLane.DEMAND)
    engine.drain()
    alone_ms = cupy.cuda.get_elapsed_time(alone.handle.start, alone.handle.end)
    prefetches = [engine.submit(store.block(ExpertId(0, e)), pool.slot(e), CopyLane.PREFETCH)
                  for e in range(6)]
    assert engine.queued >= 4  # the window holds one; the rest wait on the host
    demand = engine.submit(store.block(ExpertId(0, 6)), pool.slot(6), CopyLane.DEMAND)
    demand.handle.end.synchronize()
    # The demand landed while most prefetches were still queued on the host, so it could share
    # the link with at most the one in the window: never 6 copies' worth of waiting.
    assert engine.queued >= 3
    behind_ms = cupy.cuda.get_elapsed_time(demand.handle.start, demand.handle.end)
    assert behind_ms < 3 * alone_ms, (behind_ms, alone_ms)
    engine.drain()
    assert all(t.done for t in prefetches)
    assert torch.equal(pool.slot(6).cpu(), store.block(ExpertId(0, 6)))


def test_waiting_on_a_queued_prefetch_promotes_it(engine) -> None:  # type: ignore[no-untyped-def]
    store, pool = pinned_sources(5), poisoned_pool(5)
    tickets = [engine.submit(store.block(ExpertId(0, e)), pool.slot(e), CopyLane.PREFETCH)
               for e in range(5)]
    last = tickets[-1]
    assert last.handle is None
    engine.wait(last)
    assert engine.promotions == 1 and last.lane is CopyLane.DEMAND
    assert torch.equal(pool.slot(4).clone().cpu(), store.block(ExpertId(0, 4)))
    engine.drain()


def test_cancelled_prefetch_never_lands(engine) -> None:  # type: ignore[no-untyped-def]
    store, pool = pinned_sources(4), poisoned_pool(4)
    tickets = [engine.submit(store.block(ExpertId(0, e)), pool.slot(e), CopyLane.PREFETCH)
               for e in range(4)]
    assert not engine.cancel(tickets[0])  # already on the stream
    assert engine.cancel(tickets[3]) and tickets[3].cancelled
    with pytest.raises(ValueError, match="cancelled"):
        engine.wait(tickets[3])
    engine.drain()
    assert torch.isnan(pool.slot(3).float()).all()
    assert torch.equal(pool.slot(2).cpu(), store.block(ExpertId(0, 2)))
    assert engine.bytes_copied == 3 * BIG.nbytes


def test_a_released_slot_is_refilled_after_its_readers(engine) -> None:  # type: ignore[no-untyped-def]
    store, pool = pinned_sources(2), poisoned_pool(1)
    first = engine.submit(store.block(ExpertId(0, 0)), pool.slot(0), CopyLane.DEMAND)
    engine.wait(first)
    total = pool.slot(0).double().sum()  # a reader of the slot, on the current stream (exact)
    engine.release(first)
    second = engine.submit(store.block(ExpertId(0, 1)), pool.slot(0), CopyLane.DEMAND)
    engine.wait(second)
    assert total.item() == store.block(ExpertId(0, 0)).double().sum().item()
    assert torch.equal(pool.slot(0).cpu(), store.block(ExpertId(0, 1)))


def test_wrong_devices_are_refused(engine) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="host memory"):
        engine.submit(torch.zeros(4, device="cuda"), torch.zeros(4, device="cuda"),
                      CopyLane.DEMAND)


def test_pinned_arenas_are_registered_at_their_exact_size() -> None:
    from moe_core.offload.pinned_memory import pinned_empty

    arena = pinned_empty(3 * 2**20 + 5, torch.bfloat16)  # not a power of two
    assert arena.is_pinned() and arena.numel() == 3 * 2**20 + 5
    arena.copy_(torch.arange(arena.numel()) % 97)
    on_gpu = arena.to("cuda", non_blocking=True)
    assert torch.equal(on_gpu.cpu(), arena)
    # A view keeps the registration: only the last view's death unregisters.
    view = arena[1000:]
    del arena, on_gpu
    gc.collect()
    assert view.is_pinned()
    assert torch.equal(view.to("cuda", non_blocking=True).cpu(),
                       (torch.arange(1000, 3 * 2**20 + 5) % 97).to(torch.bfloat16))


def test_mapped_fetch_reads_missing_experts_from_host_memory_on_the_gpu(cupy) -> None:  # type: ignore[no-untyped-def]
    from moe_core.offload.mapped_fetch import MappedFetcher

    layout = ExpertLayout(256, 96, torch.bfloat16)
    store = HostExpertStore.empty(layout, [0, 1], num_experts=6, pin=True)
    for layer in (0, 1):
        store.arena(layer).copy_(torch.randn(store.arena(layer).numel()))
    pool = GpuSlotPool(layout, 4, "cuda")
    pool.slot(2).copy_(store.block(ExpertId(1, 1)))
    pool.slot(0).copy_(store.block(ExpertId(1, 4)))
    lut = torch.tensor([-1, 2, -1, -1, 0, -1], device="cuda")
    ids = torch.tensor([4, 0, 1, 0, 5, 4, 3], device="cuda")
    rows, index = MappedFetcher(store, pool).fetch_rows(1, ids, lut)
    assert index.tolist() == [0, 1, 2, 1, 4, 0, 6]  # each distinct expert read once
    for j, e in enumerate(ids.tolist()):
        assert torch.equal(rows[index[j]].cpu(), store.block(ExpertId(1, e)))
    distinct = torch.tensor([5, 1, 0, 4], device="cuda")  # one token's top-k
    rows, index = MappedFetcher(store, pool).fetch_rows(1, distinct, lut, distinct=True)
    assert index is None
    for j, e in enumerate(distinct.tolist()):
        assert torch.equal(rows[j].cpu(), store.block(ExpertId(1, e)))
