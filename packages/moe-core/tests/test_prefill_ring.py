"""Prefill chunks with their misses streamed through the prefill ring (`prefill="stream"`,
decision 0018): the same logits and greedy tokens as the copy path and the resident model, in
float32 and over FP8 stores, whatever the ring's size; the cache exactly as the call found it;
every use counted once, streamed misses as misses with their bytes over PCIe.

On the CPU the copy engine runs copies when they are awaited, so the ring's slots are reused
under the same order of copies and computations as on CUDA, without the overlap.

Dimension key: T tokens, K experts per token, E experts per layer, R ring slots.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from moe_core import (
    FP8,
    CopyLane,
    CopyTicket,
    CpuCopyEngine,
    ExpertId,
    ExpertLayout,
    GpuSlotPool,
    HostExpertStore,
    MoEForCausalLM,
    OffloadedExecutor,
    OffloadRuntime,
    PrefillRing,
    SettingError,
    install_offloading,
    load_model,
    load_offloaded,
    parse_bytes,
    tiny_model_path,
)
from moe_core.offload.prefill_ring import MAX_RING_SLOTS, PREFILL_RING_BYTES, ring_slots_for

PROMPT_TOKENS = 40  # x top-2 = 80 assignments: above E = 16, every layer uses most experts


def prompt(tokens: int = PROMPT_TOKENS, rows: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 4096, (rows, tokens), generator=torch.Generator().manual_seed(seed))


def offloaded(prefill: str, *, num_slots: int = 40, loaded: Iterable[ExpertId] | None = None,
              fetch: str = "mapped", fp8: bool = False, ring_slots: int | None = None
              ) -> tuple[MoEForCausalLM, OffloadRuntime]:
    """The embedded model in float32 on a CPU pool of `num_slots` holding `loaded` experts
    (default: every other one), with the gather limit at one token's rows and the grouped limit
    at two tokens' (decode-sized calls keep their paths; prompts are large calls)."""
    model = load_model(tiny_model_path(), dtype="float32")
    store = HostExpertStore.from_model(model, dtype=FP8 if fp8 else None, pin=False)
    pool = GpuSlotPool(store.layout, num_slots, device="cpu")
    runtime = install_offloading(model, store, pool, CpuCopyEngine(), fetch=fetch,  # type: ignore[arg-type]
                                 prefill=prefill, prefill_ring_slots=ring_slots,  # type: ignore[arg-type]
                                 drop_local_experts=True)
    chosen = store.experts()[::2] if loaded is None else list(loaded)
    runtime.prefetch(chosen[:num_slots])
    runtime.drain()
    decode_sized_limits(model, runtime)
    return model, runtime


def decode_sized_limits(model: MoEForCausalLM, runtime: OffloadRuntime) -> None:
    """The gather limit at one token's rows, and the in-place (CUDA) and grouped limits at one
    and two tokens': decode-sized calls keep their paths, prompts are large calls."""
    top_k = model.spec.moe.router.top_k
    for executor in executors(runtime):
        executor.gather_limit_bytes = top_k * runtime.store.layout.gather_nbytes
        executor.grouped_limit_assignments = 2 * top_k
        executor.in_place_limit_assignments = top_k


def executors(runtime: OffloadRuntime) -> list[OffloadedExecutor]:
    found = list(runtime.executors.values())
    assert all(isinstance(x, OffloadedExecutor) for x in found)
    return found  # type: ignore[return-value]


def resident(fp8: bool = False) -> MoEForCausalLM:
    """The embedded model fully resident (FP8: its experts replaced by their dequantised FP8
    values, what an FP8 runtime computes)."""
    model = load_model(tiny_model_path(), dtype="float32")
    if fp8:
        store = HostExpertStore.from_model(model, dtype=FP8, pin=False)
        with torch.no_grad():
            for block in model.moe_blocks():
                local = block.experts
                for e in range(local.gate_proj.shape[0]):
                    weights = store.weights(ExpertId(block.layer, e), torch.float32)
                    for param, w in zip((local.gate_proj, local.up_proj, local.down_proj),
                                        weights, strict=True):
                        param[e].copy_(w)
    return model


def distinct_uses(model: MoEForCausalLM, ids: torch.Tensor) -> int:
    """Distinct experts each layer call of a pass over `ids` uses, summed over the layers."""
    uses = 0

    def count(layer: int, expert_ids: torch.Tensor, weights: torch.Tensor) -> None:
        nonlocal uses
        uses += int(expert_ids.unique().numel())

    for block in model.moe_blocks():
        block.observer = count
    with torch.no_grad():
        model(ids)
    for block in model.moe_blocks():
        block.observer = None
    return uses


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def logits(model: MoEForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).float()


# --- Equal results, an unchanged cache, every use counted ------------------------------------


@pytest.mark.parametrize("fetch", ["mapped", "copy"])
@pytest.mark.parametrize("fp8", [False, True], ids=["fp32", "fp8"])
def test_a_streamed_prompt_equals_the_copy_path_and_the_resident_model(fetch: str,
                                                                       fp8: bool) -> None:
    ids = prompt()
    want = logits(resident(fp8), ids)
    streaming, runtime = offloaded("stream", fetch=fetch, fp8=fp8)
    copying, _ = offloaded("admit", fetch=fetch, fp8=fp8)
    top_k = streaming.spec.moe.router.top_k
    assert {x.call_path(PROMPT_TOKENS * top_k) for x in executors(runtime)} == {"stream"}
    cache = runtime.cache
    assert cache is not None
    held = {e: cache.table.slot_of(e) for e in cache.table.resident()}
    before = runtime.snapshot()
    got = logits(streaming, ids)
    assert_close(got, want)
    assert_close(got, logits(copying, ids))
    stats = runtime.snapshot()
    assert {e: cache.table.slot_of(e) for e in cache.table.resident()} == held
    assert stats.evictions == before.evictions
    hits, misses = stats.hits - before.hits, stats.misses - before.misses
    assert hits + misses == distinct_uses(resident(fp8), ids) and hits > 0 and misses > 0
    streamed = stats.streamed_bytes - before.streamed_bytes
    assert streamed == misses * runtime.store.layout.nbytes
    assert stats.bytes_copied - before.bytes_copied == streamed
    assert stats.mapped_bytes == before.mapped_bytes  # copied by the engine, not mapped reads


@pytest.mark.parametrize("fp8", [False, True], ids=["fp32", "fp8"])
def test_greedy_tokens_with_streamed_prefill_equal_the_resident_models(fp8: bool) -> None:
    ids = prompt(24, rows=2, seed=3)
    want = resident(fp8).generate(ids, max_new_tokens=6, eos_token_id=[])
    model, runtime = offloaded("stream", num_slots=20, fp8=fp8)
    assert torch.equal(model.generate(ids, max_new_tokens=6, eos_token_id=[]), want)
    stats = runtime.snapshot()
    assert stats.streamed_bytes > 0  # the prompt streamed
    assert stats.mapped_bytes > 0  # the decode steps read their misses on the device
    assert stats.evictions == 0


@pytest.mark.parametrize("ring_slots", [1, 2, 3, 5, 64])
def test_every_ring_size_gives_the_same_logits(ring_slots: int) -> None:
    """One slot (no overlap), two (one run of one copying while another computes), three and
    five (runs cut at the ring's end), and more slots than any layer's misses."""
    ids = prompt(seed=ring_slots)
    want = logits(resident(), ids)
    model, runtime = offloaded("stream", ring_slots=ring_slots)
    ring = runtime.prefill_ring
    assert ring is not None and ring.num_slots == ring_slots
    assert ring.run_length == max(1, ring_slots // 2)
    assert_close(logits(model, ids), want)
    assert runtime.snapshot().streamed_bytes > 0


class CountingExecutor:
    """An executor wrapped to record the hits, misses and streamed bytes of its calls."""

    def __init__(self, inner: OffloadedExecutor) -> None:
        self.inner = inner
        self.counts: list[tuple[int, int, int]] = []

    def __call__(self, hidden: torch.Tensor, expert_ids: torch.Tensor,
                 weights: torch.Tensor) -> torch.Tensor:
        stats = self.inner.cache.stats
        before = (stats.hits, stats.misses, stats.streamed_bytes)
        out = self.inner(hidden, expert_ids, weights)
        self.counts.append((stats.hits - before[0], stats.misses - before[1],
                            stats.streamed_bytes - before[2]))
        return out


def test_a_fully_held_layer_only_hits_and_a_layer_holding_nothing_only_streams() -> None:
    """Layer 0 entirely in the cache, no other layer at all."""
    layer0 = [ExpertId(0, e) for e in range(16)]
    ids = prompt(seed=6)
    want = logits(resident(), ids)
    model, runtime = offloaded("stream", num_slots=len(layer0), loaded=layer0)
    counting = {b.layer: CountingExecutor(runtime.executors[b.layer])  # type: ignore[arg-type]
                for b in model.moe_blocks()}
    for block in model.moe_blocks():
        block.set_executor(counting[block.layer])
    assert_close(logits(model, ids), want)
    nbytes = runtime.store.layout.nbytes
    [(hits, misses, streamed)] = counting[0].counts
    assert hits > 0 and misses == 0 and streamed == 0
    for layer in range(1, len(counting)):
        [(hits, misses, streamed)] = counting[layer].counts
        assert hits == 0 and misses > 0 and streamed == misses * nbytes
    assert runtime.cache is not None
    assert sorted(runtime.cache.table.resident()) == layer0


def test_a_prefetch_still_on_its_way_is_a_hit_and_a_stale_one_is_dropped() -> None:
    """Prefetches of layer 2 issued and not landed: the one the prompt uses is computed from
    its slot (a hit, a prefetch used), not streamed; one the prompt does not use is cancelled."""
    ids = prompt(seed=7)
    reference = resident()
    used: dict[int, set[int]] = {}

    def record(layer: int, expert_ids: torch.Tensor, weights: torch.Tensor) -> None:
        used[layer] = set(expert_ids.unique().tolist())

    for block in reference.moe_blocks():
        block.observer = record
    want = logits(reference, ids)
    picked = min(used[2])
    unused = sorted(set(range(16)) - used[2])
    model, runtime = offloaded("stream", loaded=[])
    cache = runtime.cache
    assert cache is not None and unused  # a prompt of 40 tokens leaves some expert unused
    cache.prefetch([ExpertId(2, picked), ExpertId(2, unused[0])])
    assert set(cache.pending_prefetches(2)) == {ExpertId(2, picked), ExpertId(2, unused[0])}
    before = runtime.snapshot()
    assert_close(logits(model, ids), want)
    stats = runtime.snapshot()
    assert stats.prefetches_used - before.prefetches_used == 1
    assert stats.prefetches_cancelled - before.prefetches_cancelled == 1
    assert stats.hits - before.hits == 1  # the only expert the cache held
    assert cache.table.slot_of(ExpertId(2, picked)) is not None
    assert cache.table.slot_of(ExpertId(2, unused[0])) is None


def test_calls_below_the_layers_expert_count_keep_the_copy_path_and_admit() -> None:
    """With the copy fetch, a call of fewer than E assignments above the gather limit (a small
    decode batch) still admits its misses; the ring takes E and more."""
    model, runtime = offloaded("stream", fetch="copy", loaded=[])
    top_k = model.spec.moe.router.top_k
    ring = runtime.prefill_ring
    assert ring is not None and ring.min_assignments == 16
    executor = executors(runtime)[0]  # the copy fetch has no grouped path
    assert executor.call_path(7 * top_k) == "copy" and executor.call_path(8 * top_k) == "stream"
    with torch.no_grad():
        model(prompt(4, seed=8))
    stats = runtime.snapshot()
    assert stats.streamed_bytes == 0 and runtime.cache is not None
    assert len(runtime.cache.table.resident()) > 0  # admitted


class FenceCheckingEngine(CpuCopyEngine):
    """The CPU engine, failing any copy into a ring slot whose previous copy's readers were not
    released first: on CUDA that copy would not wait for them (`CudaCopyEngine.release` fences a
    slot), and would overwrite an expert under its running products."""

    def __init__(self) -> None:
        super().__init__()
        self.watched = range(0)  # the ring's bytes, set once it exists
        self.unreleased: dict[int, CopyTicket] = {}  # ring slot address -> its last copy
        self.ring_copies = 0

    def submit(self, src: torch.Tensor, dst: torch.Tensor, lane: CopyLane,
               key: object = None) -> CopyTicket:
        ptr = dst.data_ptr()
        if ptr in self.watched:
            assert ptr not in self.unreleased, f"{key} copied over an expert still being read"
        ticket = super().submit(src, dst, lane, key)
        if ptr in self.watched:
            self.unreleased[ptr] = ticket
            self.ring_copies += 1
        return ticket

    def release(self, *tickets: CopyTicket) -> None:
        for ticket in tickets:
            if self.unreleased.get(ticket.dst_ptr) is ticket:
                del self.unreleased[ticket.dst_ptr]


@pytest.mark.parametrize("ring_slots", [1, 2, 3, 8])
def test_no_ring_slot_is_refilled_before_its_readers_are_released(ring_slots: int) -> None:
    """Three prompts in a row (each slot reused within and across layers and calls)."""
    model = load_model(tiny_model_path(), dtype="float32")
    store = HostExpertStore.from_model(model, pin=False)
    engine = FenceCheckingEngine()
    runtime = install_offloading(model, store, GpuSlotPool(store.layout, 24, device="cpu"),
                                 engine, fetch="mapped", prefill="stream",
                                 prefill_ring_slots=ring_slots, drop_local_experts=True)
    ring = runtime.prefill_ring
    assert ring is not None
    start = ring.slots.storage.data_ptr()
    engine.watched = range(start, start + ring.nbytes)
    runtime.prefetch(store.experts()[::4])
    runtime.drain()
    for executor in executors(runtime):
        executor.gather_limit_bytes = 2 * store.layout.nbytes
        executor.grouped_limit_assignments = 0  # prompts take the ring
    with torch.no_grad():
        for seed in range(3):
            model(prompt(seed=seed))
    assert engine.ring_copies == runtime.snapshot().streamed_bytes // store.layout.nbytes > 0


# --- The ring's size and the stack's options ---------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(hidden=st.integers(8, 8192), width=st.integers(8, 4096),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, FP8]))
def test_the_default_ring_holds_two_to_eight_blocks_within_its_bytes(
        hidden: int, width: int, dtype: torch.dtype) -> None:
    layout = ExpertLayout(hidden, width, dtype)
    slots = ring_slots_for(layout)
    assert 2 <= slots <= MAX_RING_SLOTS
    assert slots == 2 or slots * layout.nbytes <= PREFILL_RING_BYTES


def test_a_ring_needs_a_slot_and_a_workspace() -> None:
    _, runtime = offloaded("admit")
    assert runtime.cache is not None and runtime.prefill_ring is None
    with pytest.raises(ValueError, match="at least one slot"):
        PrefillRing(runtime.cache, 0)
    with pytest.raises(ValueError, match="workspace_bytes"):
        PrefillRing(runtime.cache, 2, workspace_bytes=0)


@pytest.mark.parametrize(("options", "message"), [
    ({"prefill": "evict"}, "prefill must be 'admit' or 'stream'"),
    ({"prefill": "stream", "kind": "streaming"}, "prefill='stream' needs kind='on_demand'"),
    ({"prefill": "stream", "cpu_compute_rule": lambda e, n: True}, "no cpu_compute_rule"),
])
def test_install_refuses_a_prefill_it_cannot_run(options: dict[str, object],
                                                 message: str) -> None:
    model = load_model(tiny_model_path(), dtype="float32")
    store = HostExpertStore.from_model(model, pin=False)
    pool = GpuSlotPool(store.layout, 8, device="cpu")
    with pytest.raises(ValueError, match=message):
        install_offloading(model, store, pool, CpuCopyEngine(), **options)  # type: ignore[arg-type]


def test_load_offloaded_takes_the_ring_out_of_the_expert_budget() -> None:
    budget = parse_bytes("8MiB")  # 17 blocks of 480 KiB
    admit = load_offloaded("tiny-moe", "cpu", budget, dtype="float32", dummy=True)
    stream = load_offloaded("tiny-moe", "cpu", budget, dtype="float32", dummy=True,
                            fetch="mapped", prefill="stream")
    ring = stream.runtime.prefill_ring
    layout = stream.runtime.store.layout
    assert ring is not None and ring.num_slots == ring_slots_for(layout)
    assert stream.runtime.pool.nbytes + ring.nbytes <= budget
    assert stream.runtime.pool.num_slots == admit.runtime.pool.num_slots - ring.num_slots
    assert stream.runtime.summary()["prefill_ring_slots"] == ring.num_slots
    assert admit.runtime.prefill_ring is None


@pytest.mark.parametrize(("options", "message"), [
    ({"prefill": "later"}, "prefill must be admit or stream"),
    ({"prefill": "stream", "kind": "streaming"}, "needs on-demand offloading"),
    ({"prefill": "stream", "expert_memory_bytes": 9 * 491_520},
     "cannot hold a prefill ring of 8 expert slots"),
])
def test_load_offloaded_refuses_a_prefill_it_cannot_run(options: dict[str, object],
                                                        message: str) -> None:
    budget = options.pop("expert_memory_bytes", parse_bytes("4MiB"))
    with pytest.raises(SettingError, match=message):
        load_offloaded("tiny-moe", "cpu", budget, dtype="float32", dummy=True,  # type: ignore[arg-type]
                       **options)  # type: ignore[arg-type]


# --- GPU: the ring's copies overlapping its products on CUDA ----------------------------------


def cuda_offloaded(prefill: str, ring_slots: int | None, fp8: bool
                   ) -> tuple[MoEForCausalLM, OffloadRuntime]:
    """The embedded model in bf16 on CUDA, mapped fetch, every third expert cached, limits as
    `offloaded`'s."""
    from moe_core.offload.copy_engines import make_copy_engine

    model = load_model(tiny_model_path(), device="cuda", dtype="bfloat16")
    store = HostExpertStore.from_model(model, dtype=FP8 if fp8 else None, pin=True)
    pool = GpuSlotPool(store.layout, 32, device="cuda")
    runtime = install_offloading(model, store, pool, make_copy_engine("cuda"), fetch="mapped",
                                 prefill=prefill, prefill_ring_slots=ring_slots,  # type: ignore[arg-type]
                                 drop_local_experts=True)
    runtime.prefetch(store.experts()[::3][:32])
    runtime.drain()
    decode_sized_limits(model, runtime)
    return model, runtime


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("ring_slots", [2, 3, 8])
def test_cuda_streamed_prompts_equal_the_copy_path(ring_slots: int, fp8: bool) -> None:
    """Several prompts in a row (each ring slot reused many times, across layers and calls):
    the copy path's logits, the cache untouched, every streamed miss counted."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("cupy")
    streaming, runtime = cuda_offloaded("stream", ring_slots, fp8)
    copying, _ = cuda_offloaded("admit", None, fp8)
    cache = runtime.cache
    assert cache is not None
    held = {e: cache.table.slot_of(e) for e in cache.table.resident()}
    for seed in range(3):
        ids = prompt(64, rows=2, seed=seed).cuda()
        want = logits(copying, ids)
        torch.testing.assert_close(logits(streaming, ids), want, rtol=2e-2,
                                   atol=2e-2 * want.abs().max().item())
    stats = runtime.snapshot(block=True)
    assert {e: cache.table.slot_of(e) for e in cache.table.resident()} == held
    assert stats.evictions == 0 and stats.hits > 0
    assert stats.streamed_bytes == stats.misses * runtime.store.layout.nbytes > 0
    runtime.close()
