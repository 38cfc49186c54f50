"""The grouped mapped path (calls above the gather limit, decode-sized): the device finds each
call's distinct experts with fixed shapes, the chunked compute equals one gathered computation at
every chunk boundary (padding rows never count, even when they hold NaN), and a model whose calls
take it gives the resident model's logits and greedy tokens, with every use counted once.

On the CPU the fetch is `MappedFetcher`'s torch path, which fills the padding rows it does not
read with NaN; the `gpu` tests repeat the equivalence on CUDA (the CuPy kernel) and capture decode
steps at batch 4 and 16 against eager ones.

Dimension key: T tokens, K experts per token, E experts per layer, C experts per chunk.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from moe_core import MoEForCausalLM, load_model, tiny_model_path
from moe_core.gathered_experts import gathered_experts
from moe_core.offload.copy_engine import CpuCopyEngine
from moe_core.offload.executors import OffloadRuntime, install_offloading
from moe_core.offload.fp8 import FP8
from moe_core.offload.gpu_slots import GpuSlotPool
from moe_core.offload.grouped_mapped import (
    GroupedPlan,
    distinct_experts,
    grouped_mapped_experts,
)
from moe_core.offload.host_store import HostExpertStore
from moe_core.offload.lane_split import LaneRates
from moe_core.offload.layout import ExpertLayout
from moe_core.offload.mapped_fetch import MappedFetcher
from moe_core.offload.offloaded_executor import OffloadedExecutor

E = 12  # experts per layer of the synthetic store
LAYER = 3


# --- Distinct experts and chunk plans --------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(tokens=st.integers(1, 16), top_k=st.integers(1, 6), experts=st.integers(6, 40),
       spare=st.integers(0, 5), seed=st.integers(0, 2**16))
def test_distinct_experts_are_the_sorted_unique_ids_then_padding(
        tokens: int, top_k: int, experts: int, spare: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    places = min(ids.numel(), experts) + spare
    got, live = distinct_experts(ids, places)
    unique = torch.unique(ids).tolist()
    assert got.shape == live.shape == (places,)
    assert live.tolist() == [i < len(unique) for i in range(places)]
    assert got[: len(unique)].tolist() == unique


@settings(max_examples=200, deadline=None)
@given(assignments=st.integers(1, 512), experts=st.integers(1, 256),
       expert_bytes=st.integers(1, 1000), workspace=st.integers(0, 40_000))
def test_a_plan_covers_every_distinct_expert_within_the_workspace(
        assignments: int, experts: int, expert_bytes: int, workspace: int) -> None:
    plan = GroupedPlan.for_call(assignments, experts, expert_bytes, workspace)
    most = min(assignments, experts)
    assert plan.num_places >= most
    assert plan.num_places - most < plan.num_chunks  # less than one padding place per chunk
    assert plan.chunk_size * expert_bytes <= max(workspace, expert_bytes)
    per_chunk = max(1, workspace // expert_bytes)
    assert plan.num_chunks == -(-most // per_chunk)  # no more chunks than the workspace needs


def test_a_plan_refuses_empty_chunks() -> None:
    with pytest.raises(ValueError, match="num_chunks"):
        GroupedPlan(0, 4)


# --- The fetch and the chunked compute on a synthetic store ----------------------------------


def synthetic(dtype: torch.dtype = torch.float32, device: str = "cpu"
              ) -> tuple[HostExpertStore, GpuSlotPool, torch.Tensor, torch.Tensor]:
    """A store of E random experts (one layer), a pool of 4 slots holding experts 1, 4, 6 and
    9, and its lut `[E]`; also every expert's weights as stored, in float32 `[E, N]` (FP8:
    dequantised, as `[gate | up | down]` blocks of the float32 layout)."""
    layout = ExpertLayout(32, 24, dtype)
    store = HostExpertStore.empty(layout, [LAYER], num_experts=E, pin=device == "cuda")
    gen = torch.Generator().manual_seed(0)
    gate, up = (torch.randn(E, 24, 32, generator=gen) * 0.2 for _ in range(2))
    down = torch.randn(E, 32, 24, generator=gen) * 0.2
    arena = store.arena(LAYER).view(E, -1)
    layout.pack_layer(gate, up, down, arena)
    blocks = arena.float().clone()  # the same positions in a float32 layout of these sizes
    if layout.is_fp8:
        gate_up, down_q = layout.dequantized_grouped(arena, torch.float32)
        blocks = torch.empty(E, 3 * 24 * 32)
        ExpertLayout(32, 24, torch.float32).pack_layer(gate_up[:, :24], gate_up[:, 24:], down_q,
                                                      blocks)
    pool = GpuSlotPool(layout, 4, device)
    lut = torch.full((E,), -1, dtype=torch.long)
    for slot, expert in enumerate((1, 4, 6, 9)):
        pool.slot(slot).copy_(arena[expert])
        lut[expert] = slot
    return store, pool, lut.to(device), blocks


def routing(tokens: int, top_k: int, experts: list[int], seed: int = 0
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """`[T, K]` ids using exactly `experts` (each row distinct, cycling through them) and random
    weights."""
    assert len(experts) <= tokens * top_k and top_k <= len(experts)
    flat = [experts[i % len(experts)] for i in range(tokens * top_k)]
    ids = torch.tensor(flat).view(tokens, top_k)
    weights = torch.rand(tokens, top_k, generator=torch.Generator().manual_seed(seed))
    return ids, weights


def reference(blocks: torch.Tensor, hidden: torch.Tensor, ids: torch.Tensor,
              weights: torch.Tensor) -> torch.Tensor:
    """The gathered computation over every expert's float32 weights."""
    return gathered_experts(hidden, ids, weights,
                            *ExpertLayout(32, 24, torch.float32).stacked_views(blocks))


def test_fetch_blocks_reads_slots_and_host_and_leaves_padding_unread() -> None:
    store, pool, lut, _ = synthetic()
    pool.slot(lut[4]).fill_(7.0)  # a slot's content tells it was read from the slot
    ids = torch.tensor([4, 0, 9, 0, 0])
    live = torch.tensor([True, True, True, False, False])
    rows = MappedFetcher(store, pool).fetch_blocks(LAYER, ids, live, lut)
    arena = store.arena(LAYER).view(E, -1)
    assert torch.equal(rows[0], torch.full_like(rows[0], 7.0))
    assert torch.equal(rows[1], arena[0]) and torch.equal(rows[2], arena[9])
    assert rows[3:].isnan().all()  # padding: not read (every bit set on the CPU path)


@pytest.mark.parametrize("dtype", [torch.float32, FP8], ids=["fp32", "fp8"])
@pytest.mark.parametrize(("tokens", "used"), [
    (8, [2, 3, 5, 7]),  # exactly one chunk (C = 4)
    (8, [0, 1, 2, 3, 8]),  # C + 1: one expert in the second chunk
    (8, list(range(E))),  # every expert of the layer: every place live
    (16, [11, 4, 6, 0, 9, 1, 2, 10]),  # twice C, resident and absent mixed
    (4, [5, 3]),  # fewer distinct than one chunk
])
def test_chunks_equal_one_gathered_computation_at_every_boundary(
        dtype: torch.dtype, tokens: int, used: list[int]) -> None:
    store, pool, lut, blocks = synthetic(dtype)
    ids, weights = routing(tokens, 2, used)
    hidden = torch.randn(tokens, 32, generator=torch.Generator().manual_seed(1))
    plan = GroupedPlan.for_call(ids.numel(), E, store.layout.nbytes, 4 * store.layout.nbytes)
    assert plan.chunk_size == 4 or ids.numel() < E  # C = 4 whenever the call can use them all
    out = grouped_mapped_experts(hidden, ids, weights, MappedFetcher(store, pool), LAYER, lut,
                                 plan)
    assert out.isfinite().all()  # NaN padding rows never reach the sum
    torch.testing.assert_close(out, reference(blocks, hidden, ids, weights), rtol=1e-5,
                               atol=1e-5)


def test_a_repeated_expert_in_a_row_adds_up_like_the_gathered_computation() -> None:
    store, pool, lut, blocks = synthetic()
    ids = torch.tensor([[3, 3], [1, 5], [5, 5]])
    weights = torch.rand(3, 2, generator=torch.Generator().manual_seed(2))
    hidden = torch.randn(3, 32, generator=torch.Generator().manual_seed(3))
    plan = GroupedPlan.for_call(ids.numel(), E, store.layout.nbytes, 2 * store.layout.nbytes)
    out = grouped_mapped_experts(hidden, ids, weights, MappedFetcher(store, pool), LAYER, lut,
                                 plan)
    torch.testing.assert_close(out, reference(blocks, hidden, ids, weights), rtol=1e-5,
                               atol=1e-5)


# --- Through the executor, on the embedded model ---------------------------------------------


def offloaded(num_slots: int, cached: str = "some", **kwargs: object
              ) -> tuple[MoEForCausalLM, OffloadRuntime]:
    """The embedded model in float32 on a CPU pool of `num_slots`, holding `cached` experts
    ("none", "some": every other one, "all": the first `num_slots`), with a gather limit of one
    token's rows: every call of two tokens or more takes the grouped mapped path (in chunks of
    K experts: many chunks per call)."""
    model = load_model(tiny_model_path(), dtype="float32")
    store = HostExpertStore.from_model(model, pin=False)
    pool = GpuSlotPool(store.layout, num_slots, device="cpu")
    runtime = install_offloading(model, store, pool, CpuCopyEngine(), **kwargs)  # type: ignore[arg-type]
    loaded = {"none": [], "some": store.experts()[::2], "all": store.experts()}[cached]
    runtime.prefetch(loaded[:num_slots])
    runtime.drain()
    top_k = model.spec.moe.router.top_k
    for executor in executors(runtime):
        executor.gather_limit_bytes = top_k * store.layout.nbytes
    return model, runtime


def executors(runtime: OffloadRuntime) -> list[OffloadedExecutor]:
    found = list(runtime.executors.values())
    assert all(isinstance(x, OffloadedExecutor) for x in found)
    return found  # type: ignore[return-value]


def resident_logits(ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The resident model's logits of `ids`, and the distinct experts its layers used."""
    model = load_model(tiny_model_path(), dtype="float32")
    uses = 0

    def count(layer: int, expert_ids: torch.Tensor, weights: torch.Tensor) -> None:
        nonlocal uses
        uses += int(expert_ids.unique().numel())

    for block in model.moe_blocks():
        block.observer = count
    with torch.no_grad():
        return model(ids).float(), uses


@pytest.mark.parametrize("batch", [4, 7, 16])
@pytest.mark.parametrize("cached", ["none", "some", "all"])
def test_grouped_calls_equal_the_resident_and_copy_paths(batch: int, cached: str) -> None:
    """A decode-shaped pass (one token per row) whose every layer call takes the grouped path:
    the resident model's logits and the copy path's, each use counted once and later (no host
    read of the routing), misses read from host memory and not admitted."""
    ids = torch.randint(3, 4096, (batch, 1), generator=torch.Generator().manual_seed(batch))
    expected, uses = resident_logits(ids)
    model, runtime = offloaded(96, cached, fetch="mapped")
    copying, _ = offloaded(96, cached, fetch="copy")
    top_k = model.spec.moe.router.top_k
    assert {x.call_path(batch * top_k) for x in executors(runtime)} == {"grouped"}
    cache = runtime.cache
    assert cache is not None
    before = runtime.snapshot()
    held = set(cache.table.resident())
    with torch.no_grad():
        got = model(ids).float()
        copied = copying(ids).float()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max())
    torch.testing.assert_close(got, copied, rtol=1e-5, atol=1e-5 * expected.abs().max())
    assert cache._deferred  # counted later: no layer read its routing on the host
    stats = runtime.snapshot()
    hits, misses = stats.hits - before.hits, stats.misses - before.misses
    assert hits + misses == uses
    assert stats.mapped_bytes == misses * runtime.store.layout.nbytes
    assert (hits > 0) == (cached != "none") and (misses > 0) == (cached != "all")
    assert set(cache.table.resident()) == held and stats.evictions == 0  # no admission


@pytest.mark.parametrize("batch", [4, 16])
def test_grouped_decode_gives_the_resident_greedy_tokens(batch: int) -> None:
    ids = torch.randint(3, 4096, (batch, 5), generator=torch.Generator().manual_seed(7))
    expected = load_model(tiny_model_path(), dtype="float32").generate(
        ids, max_new_tokens=6, eos_token_id=[])
    model, runtime = offloaded(20, fetch="mapped")
    assert torch.equal(model.generate(ids, max_new_tokens=6, eos_token_id=[]), expected)
    assert runtime.snapshot().mapped_bytes > 0


def test_the_token_limit_of_captured_steps_covers_the_grouped_path() -> None:
    model, runtime = offloaded(8, fetch="mapped")
    top_k = model.spec.moe.router.top_k
    executor = executors(runtime)[0]
    assert executor.graph_token_limit(top_k) == executor.grouped_limit_assignments // top_k
    assert executor.call_path(top_k) == "mapped" and executor.call_path(3 * top_k) == "grouped"
    executor.grouped_limit_assignments = 0  # no grouped path: only the mapped rows' token
    assert executor.graph_token_limit(top_k) == 1
    assert executor.call_path(3 * top_k) == "copy"
    _, copying = offloaded(8, fetch="copy")  # the copy fetch never groups on the device
    assert executors(copying)[0].call_path(3 * top_k) == "copy"


def test_in_place_calls_stay_in_place_while_their_expected_misses_fit_the_staging_rows(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Where Triton runs (here its interpreter, asked for), calls up to the in-place limit are
    multiplied in place while assignments x the layer's absent share fit the staging rows (the
    gather limit's blocks); above that they take the grouped path, unless told otherwise; a
    fully cached layer always fits (decision 0020)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model, runtime = offloaded(48, "some", fetch="mapped")  # half of each layer's experts
    top_k = model.spec.moe.router.top_k
    executor = executors(runtime)[0]
    layer = executor.cache.layer_map(executor.layer)
    assert layer.resident == runtime.store.num_experts // 2
    rows = top_k  # the gather limit holds one token's blocks
    assert executor.call_path(top_k) == "mapped"  # every miss has its row
    assert executor.call_path(2 * top_k) == "mapped"  # 2K x 1/2 expected misses: fit
    assert executor.call_path(3 * top_k) == "grouped"  # 1.5 rows' worth of misses
    assert executor.graph_token_limit(top_k) == executor.in_place_limit_assignments // top_k
    executor.in_place_misses_per_row = math.inf
    assert executor.call_path(8 * top_k) == "mapped"
    executor.in_place_limit_assignments = 4 * top_k
    assert executor.call_path(5 * top_k) == "grouped"
    executor.in_place_misses_per_row = 1.0
    executor.stage_misses = False  # every miss read by the product kernel: no rows to fit
    assert executor.call_path(4 * top_k) == "mapped"
    assert rows == executor.gather_limit_bytes // runtime.store.layout.nbytes
    _, full = offloaded(96, "all", fetch="mapped")
    assert {x.call_path(16 * top_k) for x in executors(full)} == {"mapped"}


def test_a_gather_limit_of_zero_still_groups_every_call_on_the_host() -> None:
    model, runtime = offloaded(8, fetch="mapped")
    for executor in executors(runtime):
        executor.gather_limit_bytes = 0
    top_k = model.spec.moe.router.top_k
    assert {x.call_path(4 * top_k) for x in executors(runtime)} == {"copy"}
    assert executors(runtime)[0].graph_token_limit(top_k) == 0
    ids = torch.randint(3, 4096, (4, 1), generator=torch.Generator().manual_seed(3))
    expected, _ = resident_logits(ids)
    with torch.no_grad():
        got = model(ids).float()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max())
    stats = runtime.snapshot()
    assert stats.mapped_bytes == 0 and stats.bytes_copied > 0  # misses copied and admitted


def test_two_lanes_leave_grouped_calls_to_the_gpu_lane_and_split_small_ones() -> None:
    """Two lanes (every miss to the CPU by the rates): a call of one token still splits its
    misses to the CPU lane; calls of four take the grouped path on the GPU lane alone."""
    every_miss_on_cpu = LaneRates(gpu_bytes_per_s=1e9, cpu_bytes_per_s=1e13, cpu_fixed_s=0.0)
    model, runtime = offloaded(6, fetch="mapped", two_lanes=True, lane_rates=every_miss_on_cpu)
    try:
        for batch in (1, 4):
            ids = torch.randint(3, 4096, (batch, 1), generator=torch.Generator().manual_seed(5))
            expected, _ = resident_logits(ids)
            before = runtime.snapshot()
            with torch.no_grad():
                got = model(ids).float()
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max())
            stats = runtime.snapshot()
            if batch == 1:
                assert stats.cpu_experts > before.cpu_experts
                assert stats.misses == before.misses
            else:
                assert stats.cpu_experts == before.cpu_experts
                assert stats.misses > before.misses
    finally:
        runtime.close()


# --- GPU: the CuPy fetch, and captured steps at batch 4 and 16 ------------------------------


def _cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("cupy")


@pytest.mark.gpu
@pytest.mark.parametrize(("tokens", "used"), [(8, [2, 3, 5, 7]), (8, [0, 1, 2, 3, 8]),
                                              (8, list(range(E))), (16, [11, 4, 6, 0, 9, 1])])
def test_cuda_chunks_equal_one_gathered_computation(tokens: int, used: list[int]) -> None:
    _cuda()
    store, pool, lut, blocks = synthetic(torch.bfloat16, "cuda")
    ids, weights = routing(tokens, 2, used)
    hidden = torch.randn(tokens, 32, generator=torch.Generator().manual_seed(1))
    plan = GroupedPlan.for_call(ids.numel(), E, store.layout.nbytes, 4 * store.layout.nbytes)
    fetcher = MappedFetcher(store, pool)
    rows = fetcher.fetch_blocks(LAYER, torch.tensor([9, 0, 0], device="cuda"),
                                torch.tensor([True, True, False], device="cuda"), lut)
    arena = store.arena(LAYER).view(E, -1)
    assert torch.equal(rows[0].cpu(), arena[9]) and torch.equal(rows[1].cpu(), arena[0])
    out = grouped_mapped_experts(hidden.cuda().bfloat16(), ids.cuda(), weights.cuda(),
                                 fetcher, LAYER, lut, plan)
    want = reference(blocks, hidden.bfloat16().float(), ids, weights)
    torch.testing.assert_close(out.float().cpu(), want, rtol=2e-2, atol=2e-2)


def cuda_offloaded(num_slots: int, path: str = "grouped",
                   dtype: str = "bfloat16") -> tuple[MoEForCausalLM, OffloadRuntime]:
    """The embedded model on CUDA (bf16 unless said), mapped fetch, its first experts cached,
    a gather limit of one token's rows and grouped and in-place limits that cover the prompt
    passes too (nothing is admitted: eager and captured runs see the same cache). `path`
    "grouped": calls of 2+ tokens take the grouped path; "mapped": every call is multiplied in
    place, one token's worth of its distinct misses staged and the rest read from host memory
    (decision 0020)."""
    from moe_core.offload.copy_engines import make_copy_engine

    model = load_model(tiny_model_path(), device="cuda", dtype=dtype)
    store = HostExpertStore.from_model(model, pin=True)
    pool = GpuSlotPool(store.layout, num_slots, device="cuda")
    runtime = install_offloading(model, store, pool, make_copy_engine("cuda"), fetch="mapped",
                                 drop_local_experts=True)
    runtime.prefetch(store.experts()[::3][:num_slots])
    runtime.drain()
    top_k = model.spec.moe.router.top_k
    for executor in executors(runtime):
        executor.gather_limit_bytes = top_k * store.layout.nbytes
        executor.grouped_limit_assignments = 16 * 8 * top_k
        executor.in_place_limit_assignments = top_k if path == "grouped" else 16 * 8 * top_k
        executor.in_place_misses_per_row = math.inf  # in place even when misses overflow
    return model, runtime


@pytest.mark.gpu
@pytest.mark.parametrize("path,dtype", [("grouped", "bfloat16"), ("mapped", "float32")])
@pytest.mark.parametrize("batch", [4, 16])
def test_cuda_grouped_calls_equal_resident_experts(batch: int, path: str, dtype: str) -> None:
    """A pass of `batch` one-token rows equals the resident model: grouped in bf16 against the
    gathered bf16 products it shares; in place in float32 (its unrounded float32 intermediate
    differs from any bf16 reference by rounding, and at batch 16 that flipped a near-tied
    routing of one row on the H200; the kernel itself is checked in bf16 in its own tests)."""
    _cuda()
    resident = load_model(tiny_model_path(), device="cuda", dtype=dtype)
    for block in resident.moe_blocks():  # the gathered products, as the grouped executors'
        block.experts.device_kernels = False
    ids = torch.randint(3, 4096, (batch, 1), generator=torch.Generator().manual_seed(batch))
    ids = ids.cuda()
    with torch.no_grad():
        expected = resident(ids).float()
    model, runtime = cuda_offloaded(20, path, dtype)
    top_k = model.spec.moe.router.top_k
    assert {x.call_path(batch * top_k) for x in executors(runtime)} == {path}
    with torch.no_grad():
        got = model(ids).float()
    scale = expected.abs().max()
    tolerance = 2e-2 if dtype == "bfloat16" else 1e-4
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance * scale)
    stats = runtime.snapshot(block=True)
    assert stats.misses > 0 and stats.hits > 0
    assert stats.mapped_bytes == stats.misses * runtime.store.layout.nbytes
    runtime.close()


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["grouped", "mapped"])
@pytest.mark.parametrize("batch", [4, 16])
def test_cuda_captured_grouped_decode_equals_eager_and_counts_every_use(batch: int,
                                                                        path: str) -> None:
    """Decode steps of `batch` rows captured through the grouped mapped path (or in place): the
    tokens of the same steps run eagerly, and the same hits, misses and mapped bytes counted."""
    _cuda()
    from moe_core.decode_runner import DecodeRunner

    model, runtime = cuda_offloaded(20, path)
    top_k = model.spec.moe.router.top_k
    assert {x.call_path(batch * top_k) for x in executors(runtime)} == {path}
    ids = torch.randint(3, 4096, (batch, 7), generator=torch.Generator().manual_seed(1))
    ids = ids.cuda()
    mask = torch.ones_like(ids)
    runs = []
    for graphs in (False, True):
        before = runtime.snapshot(block=True)
        runner = DecodeRunner(model, batch, 64, use_graphs=graphs)
        logits = runner.prefill(ids, mask)
        active = torch.ones(batch, dtype=torch.bool, device="cuda")
        tokens = []
        for _ in range(16):
            token = logits.argmax(dim=-1)
            tokens.append(token)
            logits, _ = runner.step(token, active)
        after = runtime.snapshot(block=True)
        assert sorted(runner._graphs) == ([batch] if graphs else [])
        runs.append((torch.stack(tokens, dim=1).tolist(),
                     [getattr(after, f) - getattr(before, f)
                      for f in ("hits", "misses", "mapped_bytes")]))
    (eager_tokens, eager_counts), (graph_tokens, graph_counts) = runs
    assert graph_tokens == eager_tokens
    assert graph_counts == eager_counts and eager_counts[1] > 0
    runtime.close()
