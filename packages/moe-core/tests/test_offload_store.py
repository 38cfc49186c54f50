"""The host expert store, the slot pool and the CPU copy engine's ordering (CPU, fast)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from moe_core import ExpertId, MoEForCausalLM, load_model, tiny_model_path
from moe_core.offload.copy_engine import CopyEngine, CopyLane, CpuCopyEngine
from moe_core.offload.copy_engines import make_copy_engine
from moe_core.offload.gpu_slots import GpuSlotPool
from moe_core.offload.host_store import HostExpertStore
from moe_core.offload.layout import ExpertLayout
from moe_core.tiny_checkpoints import build_tiny_checkpoint

LAYOUT = ExpertLayout(hidden_size=8, intermediate_size=4, dtype=torch.float32)


@pytest.fixture(scope="module")
def qwen2_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint("qwen2_moe", tmp_path_factory.mktemp("qwen2_moe"))


def assert_store_matches(store: HostExpertStore, model: MoEForCausalLM) -> None:
    blocks = model.moe_blocks()
    assert store.moe_layers == tuple(b.layer for b in blocks)
    assert store.num_experts == blocks[0].experts.num_experts
    for block in blocks:
        local = block.experts
        for e in range(store.num_experts):
            gate, up, down = store.weights(ExpertId(block.layer, e))
            assert torch.equal(gate, local.gate_proj[e].to(store.layout.dtype))
            assert torch.equal(up, local.up_proj[e].to(store.layout.dtype))
            assert torch.equal(down, local.down_proj[e].to(store.layout.dtype))


# --- layout -----------------------------------------------------------------------------------


def test_layout_pack_and_views_round_trip() -> None:
    gate, up = torch.randn(4, 8), torch.randn(4, 8)  # [I, D]
    down = torch.randn(8, 4)  # [D, I]
    block = torch.full((LAYOUT.numel,), float("nan"))
    LAYOUT.pack(gate, up, down, block)
    got = LAYOUT.views(block)
    for a, b in zip(got, (gate, up, down), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(block, torch.cat([gate.flatten(), up.flatten(), down.flatten()]))
    assert LAYOUT.nbytes == 3 * 4 * 8 * 4


# --- host store -------------------------------------------------------------------------------


def test_store_from_model_equals_the_experts_of_a_tiny_checkpoint(qwen2_folder: Path) -> None:
    model = load_model(qwen2_folder, dtype="float32")
    store = HostExpertStore.from_model(model, pin=False)
    assert_store_matches(store, model)
    spec = model.spec
    assert store.nbytes == spec.routed_expert_params * 4
    assert not store.is_pinned
    assert len(store.experts()) == spec.num_moe_layers * spec.moe.num_experts


def test_store_from_checkpoint_equals_the_loaded_model(qwen2_folder: Path) -> None:
    model = load_model(qwen2_folder, dtype="bfloat16")
    store = HostExpertStore.from_checkpoint(qwen2_folder, dtype="bfloat16", pin=False)
    assert store.layout.dtype == torch.bfloat16
    assert_store_matches(store, model)


def test_store_of_the_embedded_model_both_ways() -> None:
    model = load_model(tiny_model_path(), dtype="bfloat16")  # the checkpoint's, as stored
    from_model = HostExpertStore.from_model(model, pin=False)
    assert_store_matches(from_model, model)
    from_file = HostExpertStore.from_checkpoint(tiny_model_path(), pin=False)
    assert from_file.layout == from_model.layout
    for expert in from_model.experts():
        assert torch.equal(from_file.block(expert), from_model.block(expert))


def test_store_converts_dtype_and_truncates_layers(qwen2_folder: Path) -> None:
    model = load_model(qwen2_folder, dtype="float32")
    store = HostExpertStore.from_model(model, dtype=torch.float16, pin=False)
    assert store.block(ExpertId(store.moe_layers[0], 0)).dtype == torch.float16
    assert_store_matches(store, model)
    first = HostExpertStore.from_checkpoint(qwen2_folder, pin=False, num_layers=1)
    assert first.moe_layers == tuple(layer for layer in store.moe_layers if layer < 1)


def test_store_blocks_are_views_of_one_arena_per_layer(qwen2_folder: Path) -> None:
    store = HostExpertStore.from_checkpoint(qwen2_folder, pin=False)
    layer = store.moe_layers[0]
    arena = store.arena(layer)
    for e in range(store.num_experts):
        block = store.block(ExpertId(layer, e))
        assert block.untyped_storage().data_ptr() == arena.untyped_storage().data_ptr()
        assert block.data_ptr() == arena.data_ptr() + e * store.layout.nbytes
    with pytest.raises(KeyError, match="not a MoE layer"):
        store.block(ExpertId(99, 0))
    with pytest.raises(KeyError, match="out of range"):
        store.block(ExpertId(layer, store.num_experts))


def test_consecutive_rows_are_one_view_of_their_blocks_also_in_a_shard() -> None:
    """`rows` spans the blocks of consecutive rows; a shard's rows count only what it holds
    (experts 1, 4, 5 of 6 sit in rows 0, 1, 2)."""
    whole = HostExpertStore.empty(LAYOUT, [0], num_experts=6, pin=False)
    whole.arena(0).copy_(torch.arange(whole.arena(0).numel(), dtype=torch.float32))
    shard = whole.subset([ExpertId(0, e) for e in (1, 4, 5)])
    for store in (whole, shard):
        held = list(store.held(0))
        assert [store.row(ExpertId(0, e)) for e in held] == list(range(len(held)))
        span = store.rows(0, 1, 2)  # [2, N]
        assert span.shape == (2, LAYOUT.numel) and span.is_contiguous()
        for i, e in enumerate(held[1:3]):
            assert torch.equal(span[i], store.block(ExpertId(0, e)))
            assert span[i].data_ptr() == store.block(ExpertId(0, e)).data_ptr()
        with pytest.raises(IndexError):
            store.rows(0, len(held) - 1, 2)
    with pytest.raises(KeyError, match="shard"):
        shard.row(ExpertId(0, 2))


def test_pin_without_cuda_falls_back_to_pageable() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA present: pinning really happens (test_offload_cuda.py)")
    store = HostExpertStore.empty(LAYOUT, [0, 2], num_experts=3, pin=True)
    assert not store.is_pinned
    assert store.moe_layers == (0, 2) and store.nbytes == 2 * 3 * LAYOUT.nbytes


# --- slot pool --------------------------------------------------------------------------------


def test_slot_pool_sizes_from_a_budget_and_hands_out_views() -> None:
    pool = GpuSlotPool.for_budget(LAYOUT, budget_bytes=3 * LAYOUT.nbytes + 7, device="cpu")
    assert pool.num_slots == 3 and pool.nbytes == 3 * LAYOUT.nbytes
    assert pool.storage.numel() == 3 * LAYOUT.numel
    for i in range(pool.num_slots):
        pool.slot(i).fill_(i)
    assert torch.equal(pool.storage.view(3, -1)[:, 0], torch.tensor([0.0, 1.0, 2.0]))
    gate, up, down = pool.weights(1)
    assert gate.shape == (4, 8) and up.shape == (4, 8) and down.shape == (8, 4)
    assert gate.data_ptr() == pool.slot(1).data_ptr()
    assert GpuSlotPool.for_budget(LAYOUT, 100 * LAYOUT.nbytes, "cpu", max_slots=5).num_slots == 5
    with pytest.raises(IndexError):
        pool.slot(3)


def test_slot_pool_budget_too_small_names_the_budget() -> None:
    with pytest.raises(ValueError, match=r"budget of 383 B \(383 bytes\)"):
        GpuSlotPool.for_budget(LAYOUT, LAYOUT.nbytes - 1, device="cpu")
    with pytest.raises(ValueError, match="num_slots"):
        GpuSlotPool(LAYOUT, 0, device="cpu")


# --- CPU copy engine --------------------------------------------------------------------------


def blocks(n: int) -> list[torch.Tensor]:
    return [torch.full((16,), float(i)) for i in range(n)]


def test_demand_goes_before_queued_prefetches_fifo_within_lanes() -> None:
    engine = CpuCopyEngine()
    src, dst = blocks(5), [torch.zeros(16) for _ in range(5)]
    p0 = engine.submit(src[0], dst[0], CopyLane.PREFETCH, key="p0")
    engine.submit(src[1], dst[1], CopyLane.PREFETCH, key="p1")
    engine.submit(src[2], dst[2], CopyLane.DEMAND, key="d0")
    d1 = engine.submit(src[3], dst[3], CopyLane.DEMAND, key="d1")
    engine.submit(src[4], dst[4], CopyLane.PREFETCH, key="p2")
    engine.wait(d1)
    assert engine.log == ["d0", "d1"]
    assert torch.equal(dst[3], src[3]) and not p0.done
    engine.wait(p0)
    assert engine.log == ["d0", "d1", "p0"]
    engine.drain()
    assert engine.log == ["d0", "d1", "p0", "p1", "p2"]
    assert all(torch.equal(d, s) for d, s in zip(dst, src, strict=True))
    assert engine.bytes_copied == 5 * 16 * 4


def test_a_queued_prefetch_can_be_cancelled_and_not_waited() -> None:
    engine = CpuCopyEngine()
    dst = torch.zeros(16)
    ticket = engine.submit(torch.ones(16), dst, CopyLane.PREFETCH, key="stale")
    assert engine.cancel(ticket) and ticket.cancelled
    assert not engine.cancel(ticket)
    with pytest.raises(ValueError, match="cancelled"):
        engine.wait(ticket)
    engine.drain()
    assert engine.log == [] and torch.equal(dst, torch.zeros(16))
    done = engine.submit(torch.ones(16), dst, CopyLane.PREFETCH)
    engine.wait(done)
    assert not engine.cancel(done)


def test_copy_of_the_wrong_dtype_or_size_is_refused() -> None:
    engine = CpuCopyEngine()
    with pytest.raises(ValueError, match="float32"):
        engine.submit(torch.zeros(16), torch.zeros(16, dtype=torch.float16), CopyLane.DEMAND)
    with pytest.raises(ValueError, match="16"):
        engine.submit(torch.zeros(16), torch.zeros(15), CopyLane.DEMAND)


def test_engine_factory_gives_the_cpu_engine_for_cpu() -> None:
    engine = make_copy_engine("cpu")
    assert isinstance(engine, CpuCopyEngine) and isinstance(engine, CopyEngine)
    with pytest.raises(ValueError, match="meta"):
        make_copy_engine("meta")


def test_store_to_slots_through_the_cpu_engine(qwen2_folder: Path) -> None:
    """The whole host-to-slot path on CPU: a block lands in a slot and reads back as weights."""
    store = HostExpertStore.from_checkpoint(qwen2_folder, pin=False)
    pool = GpuSlotPool(store.layout, num_slots=2, device="cpu")
    engine = CpuCopyEngine()
    expert = ExpertId(store.moe_layers[-1], store.num_experts - 1)
    engine.wait(engine.submit(store.block(expert), pool.slot(1), CopyLane.DEMAND, key=expert))
    for a, b in zip(pool.weights(1), store.weights(expert), strict=True):
        assert torch.equal(a, b)


def test_pinned_memory_needs_cuda() -> None:
    from moe_core.offload.pinned_memory import pinned_empty

    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    with pytest.raises(RuntimeError, match="needs CUDA"):
        pinned_empty(4, torch.float32)


def test_to_dtype_converts_every_block_and_keeps_a_store_already_in_it(
        qwen2_folder: Path) -> None:
    store = HostExpertStore.from_checkpoint(qwen2_folder, dtype="bfloat16", pin=False)
    assert store.to_dtype(torch.bfloat16) is store
    wide = store.to_dtype(torch.float32)
    assert wide.layout.dtype == torch.float32 and wide.moe_layers == store.moe_layers
    for expert in store.experts():
        assert torch.equal(wide.block(expert), store.block(expert).float())
