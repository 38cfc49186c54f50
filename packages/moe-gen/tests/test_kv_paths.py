"""The KV paths of a step: page slots computed a micro-batch at a time, the real tokens of a
padded micro-batch, and the mover's gathers (CPU, and CUDA on the GPU machine: its own copy
stream, a ring reused many times over)."""

from __future__ import annotations

import pytest
import torch
from moe_core import ModelSpec, resolve_model_path
from moe_gen.kv_mover import KVMover
from moe_gen.mapped_kv_mover import MappedKVMover
from moe_gen.micro_batch import MicroBatch, SequenceInput
from moe_gen.paged_kv import PagedKV, table_tensor


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    return ModelSpec.from_pretrained(resolve_model_path("tiny-moe", weights=False))


def test_batch_slots_follow_each_page_table(spec: ModelSpec) -> None:
    pages = PagedKV(spec, num_pages=12, page_tokens=4, dtype=torch.float32)
    tables = [pages.allocate(10), pages.allocate(3), pages.allocate(7)]
    assert all(t is not None for t in tables)
    pages.release(tables[1])  # freed pages are handed out again: tables need not be runs
    tables[1] = pages.allocate(9)
    positions = torch.tensor([[0, 5, 9], [8, 1, 4], [6, 3, 0]])
    got = pages.batch_slots(tables, positions)  # type: ignore[arg-type]
    for i, table in enumerate(tables):
        for j, pos in enumerate(positions[i].tolist()):
            assert got[i, j] == table[pos // 4] * 4 + pos % 4  # type: ignore[index]
    assert torch.equal(pages.batch_slots(table_tensor(tables), positions), got)  # type: ignore[arg-type]


def test_table_tensor_pads_ragged_tables_with_page_zero() -> None:
    tables = [[5, 2, 9], [], [7], [1, 3, 4, 8]]
    assert table_tensor(tables).tolist() == [[5, 2, 9, 0], [0, 0, 0, 0], [7, 0, 0, 0],
                                             [1, 3, 4, 8]]
    assert table_tensor(tables).dtype == torch.int64
    assert table_tensor([[], []]).shape == (2, 0)


def test_micro_batch_packs_real_tokens_and_their_slots(spec: ModelSpec) -> None:
    pages = PagedKV(spec, num_pages=16, page_tokens=4, dtype=torch.float32)
    tables = [pages.allocate(12) for _ in range(3)]
    seqs = [SequenceInput(tables[0], 5, [1, 2], 0), SequenceInput(tables[1], 0, [3, 4, 5, 6], 2),
            SequenceInput(tables[2], 2, [7], 6)]  # type: ignore[arg-type]
    batch = MicroBatch(seqs, pages, torch.device("cpu"))
    b, t = batch.shape
    assert (b, t, batch.num_past, batch.num_valid) == (3, 4, 5, 7)
    x = torch.arange(b * t).view(b, t, 1)
    assert batch.take_valid(x).flatten().tolist() == [0, 1, 4, 5, 6, 7, 8]
    assert batch.real_rows.tolist() == [0, 1, 2, 3, 4, 5, 6]
    expected = [tables[0][p // 4] * 4 + p % 4 for p in (5, 6)]  # type: ignore[index]
    expected += [tables[1][p // 4] * 4 + p % 4 for p in range(4)]  # type: ignore[index]
    expected += [tables[2][0] * 4 + 2]  # type: ignore[index]
    assert batch.new_slots.tolist() == expected
    decode = MicroBatch([SequenceInput(tables[0], 5, [1], 0)], pages, torch.device("cpu"))
    assert decode.valid_index is None  # no padding: nothing to index


def test_mover_gathers_and_flushes_on_the_cpu(spec: ModelSpec) -> None:
    mover = KVMover(torch.device("cpu"), ring_size=1)
    arena = torch.arange(40.0).view(20, 2)
    slots = torch.tensor([3, 0, 7])
    assert torch.equal(mover.gather(arena, slots), arena[slots])
    mover.release()
    mover.scatter(arena, torch.tensor([1]), torch.tensor([[-1.0, -2.0]]))
    assert arena[1].tolist() == [2.0, 3.0]  # deferred
    mover.flush()
    assert arena[1].tolist() == [-1.0, -2.0]
    with pytest.raises(ValueError, match="ring_size"):
        KVMover(torch.device("cpu"), ring_size=0)


def test_planned_gathers_come_from_the_worker_and_a_mismatch_drops_the_plan() -> None:
    """The worker gathers planned requests ahead into a ring of staging buffers (reused many
    times over here); a gather that differs from the plan drops the rest and still returns the
    right rows, as does a later plan."""
    mover = KVMover(torch.device("cpu"), ring_size=2, gather_ahead=True)
    arena = torch.randn(512, 3, 4)
    generator = torch.Generator().manual_seed(0)
    requests = [(arena, torch.randint(0, 512, (int(n),), generator=generator))
                for n in torch.randint(1, 300, (20,), generator=generator)]
    for _ in range(2):
        mover.plan(requests)
        for a, slots in requests:
            assert torch.equal(mover.gather(a, slots), arena[slots])
    mover.plan(requests)
    for a, slots in requests[:5]:
        assert torch.equal(mover.gather(a, slots), arena[slots])
    other = torch.randint(0, 512, (7,), generator=generator)
    assert torch.equal(mover.gather(arena, other), arena[other])  # not planned: dropped
    assert torch.equal(mover.gather(*requests[5]), arena[requests[5][1]])  # no plan left
    mover.plan(requests[:3])
    assert [torch.equal(mover.gather(a, s), arena[s]) for a, s in requests[:3]] == [True] * 3
    mover.plan(requests)  # copies started ahead of the asks, some then dropped
    mover.issue_ahead(4)
    assert torch.equal(mover.gather(*requests[0]), arena[requests[0][1]])
    mover.issue_ahead(2)
    assert torch.equal(mover.gather(*requests[1]), arena[requests[1][1]])
    assert torch.equal(mover.gather(arena, other), arena[other])
    mover.close()
    assert torch.equal(mover.gather(arena, other), arena[other])


def test_a_failed_planned_gather_raises_in_the_caller() -> None:
    mover = KVMover(torch.device("cpu"), ring_size=1, gather_ahead=True)
    arena = torch.zeros(8, 2)
    bad = torch.tensor([3, 99])
    mover.plan([(arena, bad)])
    with pytest.raises(IndexError):
        mover.gather(arena, bad)


def test_mapped_mover_gathers_planned_and_unplanned_rows_through_its_ring() -> None:
    """The mapped mover (the device reads the pages itself; index_select on the CPU) returns
    the right rows for planned gathers, gathers issued ahead, a gather off the plan, and after
    a new plan, many times around its ring."""
    mover = MappedKVMover(torch.device("cpu"), ring_size=2)
    arena = torch.randn(512, 3, 4)
    generator = torch.Generator().manual_seed(0)
    requests = [(arena, torch.randint(0, 512, (int(n),), generator=generator))
                for n in torch.randint(1, 300, (20,), generator=generator)]
    for _ in range(2):
        mover.plan(requests)
        for i, (a, slots) in enumerate(requests):
            if i % 4 == 0:
                mover.issue_ahead(2)
            assert torch.equal(mover.gather(a, slots), arena[slots])
            mover.release()
    other = torch.randint(0, 512, (7,), generator=generator)
    mover.plan(requests)
    mover.issue_ahead(2)
    assert torch.equal(mover.gather(arena, other), arena[other])  # off the plan: dropped
    assert torch.equal(mover.gather(*requests[3]), arena[requests[3][1]])
    mover.release()
    assert mover.h2d_bytes > 2 * sum(s.numel() for _, s in requests) * 12 * 4


def test_mapped_mover_never_rewrites_a_gather_before_its_release() -> None:
    """A ring buffer is reused once its readers are released (same memory), and a gather not
    released yet keeps its rows however many gathers follow (a fresh buffer takes its place)."""
    mover = MappedKVMover(torch.device("cpu"), ring_size=2)
    arena = torch.randn(256, 8)
    first = mover.gather(arena, torch.arange(10))
    kept = [mover.gather(arena, torch.arange(i, i + 10)) for i in range(1, 6)]  # no release
    assert torch.equal(first, arena[:10])
    assert all(torch.equal(k, arena[i:i + 10]) for i, k in enumerate(kept, start=1))
    mover.release()
    a = mover.gather(arena, torch.arange(20, 25))
    mover.release()
    b = mover.gather(arena, torch.arange(30, 35))
    mover.release()
    c = mover.gather(arena, torch.arange(40, 45))  # back on a's buffer, released: reused
    assert c.data_ptr() == a.data_ptr() and b.data_ptr() != a.data_ptr()
    assert torch.equal(c, arena[40:45])


def test_engine_rejects_an_unknown_kv_gather() -> None:
    from moe_gen.engine import _kv_mover

    pages = PagedKV(ModelSpec.from_pretrained(resolve_model_path("tiny-moe", weights=False)),
                    num_pages=2, page_tokens=4, dtype=torch.float32)
    assert isinstance(_kv_mover("mapped", pages, torch.device("cpu"), 2), MappedKVMover)
    assert type(_kv_mover("staged", pages, torch.device("cpu"), 2)) is KVMover
    assert type(_kv_mover("auto", pages, torch.device("cpu"), 2)) is KVMover  # the CPU: staged
    with pytest.raises(ValueError, match="kv_gather must be"):
        _kv_mover("dma", pages, torch.device("cpu"), 2)


@pytest.mark.gpu
@pytest.mark.parametrize("mapped", [False, True], ids=["staged", "mapped"])
@pytest.mark.parametrize("planned", [False, True])
def test_cuda_gathers_through_a_reused_ring_on_their_own_stream(planned: bool,
                                                                 mapped: bool) -> None:
    """Both movers on CUDA: gathers on their own stream, a ring reused six times over (some
    gathers never released), planned gathers issued ahead of their asks, and new entries
    written back after work queued before the flush; then a second step with more rows (the
    mapped mover's index buffers reused and grown) and a flush into two arenas."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    device = torch.device("cuda")
    mover = MappedKVMover(device, ring_size=2) if mapped else KVMover(device, ring_size=2)
    arena = torch.randn(4096, 8, 16).pin_memory()
    generator = torch.Generator().manual_seed(0)
    outs, wanted = [], []
    all_slots = [torch.randint(0, 4096, (int(n),), generator=generator)
                 for n in torch.randint(500, 1500, (12,), generator=generator)]
    if planned:  # the staged mover's worker gathers ahead, three times around its staging ring
        mover.plan([(arena, slots) for slots in all_slots])
    for i, slots in enumerate(all_slots):
        if planned and i % 3 == 0:
            mover.issue_ahead(2)  # device work starts before the asks
        got = mover.gather(arena, slots)
        outs.append(got * 1)  # read on the current stream, which waits for the gather
        wanted.append(arena[slots])
        if len(outs) % 3 == 0:
            mover.release()
    assert mover._stream is not None and mover._stream != torch.cuda.current_stream()
    for got, want in zip(outs, wanted, strict=True):
        assert torch.equal(got.cpu(), want)
    assert mover.h2d_bytes == sum(s.numel() for s in all_slots) * 8 * 16 * 4
    values = torch.randn(3, 8, 16, device=device)
    later = values * 2  # queued on the compute stream before the flush
    mover.scatter(arena, torch.tensor([5, 9, 4000]), later)
    mover.flush()
    torch.cuda.synchronize()
    assert torch.equal(arena[[5, 9, 4000]], later.cpu())
    # A second step: the index buffers of the plan and of the flush are reused, and grow.
    second = [torch.randint(0, 4096, (3000,), generator=generator) for _ in range(3)]
    if planned:
        mover.plan([(arena, slots) for slots in second])
    for slots in second:
        assert torch.equal(mover.gather(arena, slots).cpu(), arena[slots])
        mover.release()
    other = torch.zeros(64, 8, 16).pin_memory()
    mover.scatter(arena, torch.tensor([1, 2]), values[:2] + 1)
    mover.scatter(other, torch.tensor([63]), values[2:] - 1)
    mover.scatter(arena, torch.arange(100, 3100), torch.ones(3000, 8, 16, device=device))
    mover.flush()
    torch.cuda.synchronize()
    assert torch.equal(arena[[1, 2]], (values[:2] + 1).cpu())
    assert torch.equal(other[63], (values[2] - 1).cpu())
    assert bool((arena[100:3100] == 1).all())


def test_mapped_mover_writes_new_entries_back_at_flush() -> None:
    mover = MappedKVMover(torch.device("cpu"), ring_size=1)
    arena = torch.arange(40.0).view(20, 2)
    mover.scatter(arena, torch.tensor([1, 5]), torch.tensor([[-1.0, -2.0], [-3.0, -4.0]]))
    mover.scatter(arena, torch.tensor([7]), torch.tensor([[-5.0, -6.0]]))
    assert arena[1].tolist() == [2.0, 3.0]  # deferred
    mover.flush()
    assert [arena[i].tolist() for i in (1, 5, 7)] == [[-1.0, -2.0], [-3.0, -4.0], [-5.0, -6.0]]
    assert arena[0].tolist() == [0.0, 1.0]
