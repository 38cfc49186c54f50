"""Two-lane decode: the CPU expert kernels equal the reference expert MLP, the cost model never
makes a call slower than fetching everything, the device split picks what the model says, and
a model decoding over both lanes gives the resident model's greedy tokens, with every expert use
counted once (as a hit, a GPU-lane miss or a CPU computation).

On the CPU, "device" and host are the same memory: the GPU lane is the mapped fetch's torch path
and the CPU lane's worker runs in its thread at the same time, through the same semaphores a CUDA
stream posts and waits on. The `gpu` tests repeat the equivalence on CUDA, eager and captured.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from moe_core import MoEForCausalLM, load_model, tiny_model_path
from moe_core.offload.copy_engine import CpuCopyEngine
from moe_core.offload.cpu_experts import (
    NumbaCpuExperts,
    TorchCpuExperts,
    choose_cpu_kernel,
    cpu_kernels,
    time_cpu_kernel,
)
from moe_core.offload.cpu_lane import CpuLaneCounts
from moe_core.offload.executors import OffloadRuntime, install_offloading
from moe_core.offload.gpu_slots import GpuSlotPool
from moe_core.offload.host_flag import HostFlag
from moe_core.offload.host_semaphore import HostSemaphore
from moe_core.offload.host_store import HostExpertStore
from moe_core.offload.lane_signals import STOP, lane_signals
from moe_core.offload.lane_split import (
    MIN_SAVING_SHARE,
    LaneRates,
    LaneSplit,
    cpu_share_table,
    expected_saving,
    lane_saving,
    miss_distribution,
)
from moe_core.offload.layout import ExpertLayout
from moe_core.offload.token_groups import expert_mlp
from moe_core.offload.two_lanes import (
    ADAPT_EVERY_JOBS,
    EARLY_DROP_CALLS,
    LaneCalibration,
    TwoLanes,
)

ALL_CPU = LaneRates(gpu_bytes_per_s=1e9, cpu_bytes_per_s=1e13, cpu_fixed_s=0.0)
BALANCED = LaneRates(gpu_bytes_per_s=20e9, cpu_bytes_per_s=20e9, cpu_fixed_s=0.0)


def reference_layer(blocks: torch.Tensor, layout: ExpertLayout, hidden: torch.Tensor,
                    ids: torch.Tensor, weights: torch.Tensor,
                    on_cpu: torch.Tensor) -> torch.Tensor:
    """The weighted sum of the chosen experts' MLPs, one assignment at a time, in float32."""
    out = torch.zeros(hidden.shape[0], layout.hidden_size)
    for t in range(ids.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if on_cpu[e]:
                gate, up, down = (w.float() for w in layout.views(blocks[e]))
                out[t] += weights[t, k] * expert_mlp(hidden[t : t + 1], gate, up, down)[0]
    return out


@settings(max_examples=25, deadline=None)
@given(tokens=st.integers(1, 6), top_k=st.integers(1, 4), seed=st.integers(0, 2**16),
       bf16=st.booleans())
def test_cpu_kernels_equal_the_reference_expert_mlp(tokens: int, top_k: int, seed: int,
                                                    bf16: bool) -> None:
    dtype = torch.bfloat16 if bf16 else torch.float32
    layout = ExpertLayout(hidden_size=48, intermediate_size=40, dtype=dtype)
    gen = torch.Generator().manual_seed(seed)
    num_experts = 8
    blocks = (torch.randn(num_experts, layout.numel, generator=gen) * 0.2).to(dtype)
    hidden = torch.randn(tokens, layout.hidden_size, generator=gen)
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k]
                       for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=gen)
    on_cpu = torch.rand(num_experts, generator=gen) < 0.6
    want = reference_layer(blocks, layout, hidden, ids, weights, on_cpu)
    for kernel in cpu_kernels():
        out = torch.full((tokens, layout.hidden_size), float("nan"))
        kernel(blocks, layout, hidden, ids, weights, on_cpu, out)
        # torch's kernel rounds its intermediate products to the store's dtype (bf16: ~2^-8)
        tol = 2e-2 if bf16 and kernel.name == "torch" else 1e-5
        torch.testing.assert_close(out, want, rtol=tol, atol=tol * (1 + want.abs().max().item()))


def test_both_kernels_are_available_and_the_choice_is_timed() -> None:
    names = [k.name for k in cpu_kernels()]
    assert names == ["torch", "numba"]  # numba is a dependency of moe-core
    layout = ExpertLayout(hidden_size=256, intermediate_size=128, dtype=torch.bfloat16)
    blocks = torch.randn(6, layout.numel).to(torch.bfloat16)
    chosen, timings = choose_cpu_kernel(blocks, layout, [TorchCpuExperts(), NumbaCpuExperts()])
    assert [t.name for t in timings] == ["torch", "numba"]
    assert chosen.name == min(timings, key=lambda t: t.seconds).name
    assert all(t.gb_per_s > 0 for t in timings)


@settings(max_examples=60, deadline=None)
@given(gpu=st.floats(1e9, 100e9), cpu=st.floats(1e9, 100e9), fixed=st.floats(0, 2e-4),
       tokens=st.integers(1, 64), top_k=st.integers(1, 8))
def test_the_split_is_never_slower_than_fetching_everything(gpu: float, cpu: float, fixed: float,
                                                            tokens: int, top_k: int) -> None:
    rates = LaneRates(gpu_bytes_per_s=gpu, cpu_bytes_per_s=cpu, cpu_fixed_s=fixed)
    expert_bytes, num_experts = 9_437_184, 128
    table = cpu_share_table(rates, expert_bytes, num_experts, tokens, top_k)
    assert len(table) == min(num_experts, tokens * top_k) + 1 and table[0] == 0
    for m, n in enumerate(table):
        assert 0 <= n <= m
        gpu_only = m * expert_bytes / gpu
        gpu_part = (m - n) * expert_bytes / gpu
        assert gpu_part <= gpu_only  # the GPU lane never does more than alone
        if n:  # the CPU share is used only when the model says it finishes sooner
            assert fixed + n * expert_bytes / cpu <= gpu_only + 1e-12


def test_equal_lanes_split_the_misses_in_half_and_a_slow_cpu_gets_none() -> None:
    equal = LaneRates(gpu_bytes_per_s=50e9, cpu_bytes_per_s=50e9, cpu_fixed_s=0.0)
    assert cpu_share_table(equal, 10**7, 128, 1, 8) == [0, 0, 1, 1, 2, 2, 3, 3, 4]
    slow = LaneRates(gpu_bytes_per_s=50e9, cpu_bytes_per_s=5e9, cpu_fixed_s=1e-3)
    assert not any(cpu_share_table(slow, 10**6, 128, 1, 8))


def test_the_device_split_gives_the_cpu_the_missed_experts_with_fewest_tokens() -> None:
    split = LaneSplit([0, 1, 1, 2, 2], num_experts=8, device=torch.device("cpu"))
    ids = torch.tensor([[1, 3], [1, 5], [1, 6], [3, 0]])  # tokens: e1 3, e3 2, e5 1, e6 1, e0 1
    lut = torch.tensor([-1, -1, 4, -1, 2, -1, -1, 7])  # e2, e4, e7 resident
    on_cpu, gpu_lut = split(ids, lut)
    # missed: e0 (1 token), e1 (3), e3 (2), e5 (1), e6 (1): m = 5 -> table[4] clamps to 2
    assert on_cpu.nonzero().view(-1).tolist() == [0, 5]
    assert gpu_lut.tolist() == [-2, -1, 4, -1, 2, -2, -1, 7]


def test_a_split_table_is_rewritten_in_place() -> None:
    split = LaneSplit([0, 1, 1], num_experts=4, device=torch.device("cpu"))
    table = split.table
    split.update([0, 0, 2])
    assert split.table is table and table.tolist() == [0, 0, 2] == split.cpu_share
    with pytest.raises(ValueError, match="3 entries"):
        split.update([0, 1])


def tiny_lanes(rates: LaneRates, *, round_trip: bool = False,
               absent: Callable[[], list[int]] | None = None
               ) -> tuple[TwoLanes, HostExpertStore]:
    model = load_model(tiny_model_path(), dtype="float32")
    store = HostExpertStore.from_model(model, pin=False)
    pool = GpuSlotPool(store.layout, 4, device="cpu")
    calibration = LaneCalibration(rates, TorchCpuExperts(), [], gpu_measured=False)
    return TwoLanes(store, pool, calibration, measure_round_trip=round_trip, top_k=2,
                    absent_experts=absent), store


def test_the_lanes_fixed_cost_is_at_least_the_measured_round_trip() -> None:
    lanes, _ = tiny_lanes(BALANCED, round_trip=True)
    try:
        assert 0 < lanes.round_trip_s < 0.1
        assert lanes.rates.cpu_fixed_s == lanes.calibration.rates.cpu_fixed_s
        assert lanes.rates.cpu_fixed_s == max(BALANCED.cpu_fixed_s, lanes.round_trip_s)
        assert lanes.lane.take_counts().jobs == 0  # the measurement's calls are not decode's
    finally:
        lanes.close()


def test_a_cpu_lane_slower_than_calibrated_is_refitted_and_given_fewer_experts() -> None:
    lanes, store = tiny_lanes(BALANCED)
    try:
        nbytes = store.layout.nbytes
        split = lanes.split(1, 8)
        assert split is not None and any(split.cpu_share)
        before = split.cpu_share
        # Fewer calls than a re-fit needs: nothing changes yet (they count towards the next).
        lanes.observe(CpuLaneCounts(jobs=4, idle_jobs=4, busy_seconds=4 * 50e-6,
                                    idle_busy_seconds=4 * 50e-6))
        assert lanes.rates == BALANCED and split.cpu_share == before
        # The lane ran 100x slower than calibrated, with 50 us per call whatever it did.
        jobs, idle = ADAPT_EVERY_JOBS, ADAPT_EVERY_JOBS // 2
        working_bytes = (jobs - idle) * 2 * nbytes
        lanes.observe(CpuLaneCounts(
            experts=(jobs - idle) * 2, tokens=(jobs - idle) * 2, bytes=working_bytes,
            jobs=jobs, idle_jobs=idle, idle_busy_seconds=idle * 50e-6,
            busy_seconds=idle * 50e-6 + (jobs - idle) * 50e-6 + working_bytes / 20e7))
        assert lanes.refits == 1
        assert lanes.rates.cpu_fixed_s == pytest.approx(50e-6)
        assert lanes.rates.cpu_bytes_per_s == pytest.approx(20e7, rel=1e-6)
        assert lanes.rates.gpu_bytes_per_s == BALANCED.gpu_bytes_per_s
        assert split.cpu_share == cpu_share_table(lanes.rates, nbytes, store.num_experts, 1, 8)
        assert sum(split.cpu_share) < sum(before)
        # A lane faster than its calibration is not believed faster than calibrated.
        lanes.observe(CpuLaneCounts(experts=jobs, tokens=jobs, bytes=jobs * nbytes, jobs=jobs,
                                    busy_seconds=1e-9))
        assert lanes.rates.cpu_bytes_per_s == pytest.approx(BALANCED.cpu_bytes_per_s)
    finally:
        lanes.close()


def test_the_lanes_saving_counts_the_round_trip_of_every_call() -> None:
    rates = LaneRates(gpu_bytes_per_s=1e9, cpu_bytes_per_s=1e9, cpu_fixed_s=0.0)
    table = [0, 0, 1, 1, 2]  # m missed -> n to the CPU
    # Every call missed 4 experts of 1 ms each: 4 ms alone, 2 ms split, minus the round trip.
    assert lane_saving(rates, 10**6, table, [0, 0, 0, 0, 10], 0.0) == pytest.approx(2e-3)
    assert lane_saving(rates, 10**6, table, [0, 0, 0, 0, 10], 0.5e-3) == pytest.approx(1.5e-3)
    # Calls that missed nothing gain nothing and still pay the round trip.
    assert lane_saving(rates, 10**6, table, [10, 0, 0, 0, 0], 0.5e-3) == pytest.approx(-0.5e-3)
    assert lane_saving(rates, 10**6, table, [0] * 5, 0.5e-3) == 0.0


def test_the_misses_per_call_follow_each_layers_residency() -> None:
    # One token routes to 8 distinct experts of 128: a complete layer never misses, an empty
    # one misses all 8, and the layers weigh alike.
    assert miss_distribution([0], 128, 1, 8) == [1.0] + [0.0] * 8
    assert miss_distribution([128], 128, 1, 8) == [0.0] * 8 + [1.0]
    share = miss_distribution([0, 128, 10, 64], 128, 1, 8)
    assert len(share) == 9 and sum(share) == pytest.approx(1.0)
    mean = sum(m * p for m, p in enumerate(share))
    assert mean == pytest.approx(8 * (0 + 128 + 10 + 64) / 128 / 4)
    # Four tokens: ~29 distinct experts of the 32 assignments, half of them absent.
    four = miss_distribution([64], 128, 4, 8)
    assert len(four) == 33 and sum(four) == pytest.approx(1.0)
    assert sum(m * p for m, p in enumerate(four)) == pytest.approx(29 * 0.5)
    with pytest.raises(ValueError, match="at least one layer"):
        miss_distribution([], 128, 1, 8)
    with pytest.raises(ValueError, match=r"within 0\.\.128"):
        miss_distribution([129], 128, 1, 8)


S3_LAYERS, S3_EXPERTS, S3_TOP_K = 24, 128, 8
FP8_BLOCK = 3 * 2048 * 768 + 4 * (2 * 768 + 2048)  # e4m3 weights and float32 scales
BF16_BLOCK = 3 * 2048 * 768 * 2


def s3_absent(slots: int, *, in_store_order: bool) -> list[int]:
    """Per layer, the experts of S3 missing from a cache of `slots`: spread evenly, or the
    store's first experts (what the benchmark prefetches: the last layers miss everything)."""
    if in_store_order:
        return [S3_EXPERTS - min(S3_EXPERTS, max(0, slots - layer * S3_EXPERTS))
                for layer in range(S3_LAYERS)]
    each, extra = divmod(slots, S3_LAYERS)
    return [S3_EXPERTS - each - (layer < extra) for layer in range(S3_LAYERS)]


@pytest.mark.parametrize("in_store_order", [False, True], ids=["spread", "store_order"])
@pytest.mark.parametrize("round_trip", [80e-6, 130e-6], ids=["rt80us", "rt130us"])
def test_fp8_at_s3_declines_the_lane_and_bf16_takes_it(round_trip: float,
                                                       in_store_order: bool) -> None:
    """The H200 measurements (decision 0019): FP8 experts, 92% cached, one lane 3.65 ms/token
    and two lanes 5.92; bf16, 46% cached, two lanes 17.22 ms against one lane's 22.24."""
    def saving(block: int, cpu_rate: float, slots: int) -> float:
        rates = LaneRates(gpu_bytes_per_s=44e9, cpu_bytes_per_s=cpu_rate,
                          cpu_fixed_s=round_trip)
        absent = s3_absent(slots, in_store_order=in_store_order)
        return expected_saving(rates, block, absent, S3_EXPERTS, 1, S3_TOP_K, round_trip)

    margin = MIN_SAVING_SHARE * round_trip
    # FP8 (~0.6 misses per layer call): declined, even were the CPU lane as fast as its
    # calibration has claimed (21-50 GB/s)
    for cpu_rate in (21e9, 30e9, 50e9):
        assert saving(FP8_BLOCK, cpu_rate, 2832) < margin
    # bf16 (~4.3 misses per layer call): taken, saving a few ms per token (measured 5.0)
    bf16 = saving(BF16_BLOCK, 30e9, 1420)
    assert bf16 >= margin
    assert 3e-3 < bf16 * S3_LAYERS < 8e-3


def test_a_shape_the_model_expects_to_lose_is_declined_before_any_call() -> None:
    rates = LaneRates(gpu_bytes_per_s=1e7, cpu_bytes_per_s=1e13, cpu_fixed_s=1e-4)
    every_expert_cached = tiny_lanes(rates, absent=lambda: [0] * 6)[0]
    nothing_cached = tiny_lanes(rates, absent=lambda: [16] * 6)[0]
    try:
        # Every call would pay the lane's 0.1 ms and none has a miss to move.
        assert every_expert_cached.split(1, 2) is None
        assert every_expert_cached.declined == {(1, 2)}
        assert every_expert_cached.expected_saving_s[(1, 2)] == pytest.approx(-1e-4)
        assert every_expert_cached.split(1, 2) is None  # decided once
        # Every call misses both experts, 49 ms each over PCIe and next to nothing on the CPU.
        split = nothing_cached.split(1, 2)
        assert split is not None and split.cpu_share == [0, 1, 2]
        assert not nothing_cached.declined
        assert nothing_cached.expected_saving_s[(1, 2)] > 0.09
    finally:
        every_expert_cached.close()
        nothing_cached.close()


def test_a_lane_that_clearly_loses_is_dropped_before_a_re_fit() -> None:
    lanes, store = tiny_lanes(ALL_CPU)
    try:
        split = lanes.split(1, 2)
        assert split is not None
        token = lanes.capture_token
        lanes.round_trip_s = 1e-3
        resident = torch.arange(store.num_experts)  # nothing missed: each call loses 1 ms
        for _ in range(EARLY_DROP_CALLS):
            split(torch.tensor([[3, 5]]), resident)
        lanes.observe(CpuLaneCounts(jobs=EARLY_DROP_CALLS - 1, idle_jobs=EARLY_DROP_CALLS - 1))
        assert lanes.split(1, 2) is split  # too few jobs since the last look
        lanes.observe(CpuLaneCounts(jobs=1, idle_jobs=1))
        assert lanes.refits == 0 and lanes.split(1, 2) is None
        assert lanes.dropped == {(1, 2)} and lanes.capture_token is not token
    finally:
        lanes.close()


def test_a_re_fit_prices_every_call_since_the_last_one() -> None:
    lanes, store = tiny_lanes(ALL_CPU)
    try:
        split = lanes.split(1, 2)
        assert split is not None
        lanes.round_trip_s = 1e-5
        absent = torch.full((store.num_experts,), -1)
        resident = torch.arange(store.num_experts)
        for _ in range(EARLY_DROP_CALLS):  # paying calls: both experts missed
            split(torch.tensor([[3, 5]]), absent)
        lanes.observe(CpuLaneCounts(jobs=EARLY_DROP_CALLS, experts=2 * EARLY_DROP_CALLS,
                                    tokens=2 * EARLY_DROP_CALLS,
                                    bytes=2 * EARLY_DROP_CALLS * store.layout.nbytes))
        assert lanes.split(1, 2) is split and split.seen.tolist() == [0, 0, 0]  # taken
        for _ in range(10):  # then calls with nothing to move, each losing the round trip
            split(torch.tensor([[3, 5]]), resident)
        rest = ADAPT_EVERY_JOBS - EARLY_DROP_CALLS
        lanes.observe(CpuLaneCounts(jobs=rest, idle_jobs=rest))
        # re-fitted over all 34 calls (alone, the last 10 would have dropped the shape)
        assert lanes.refits == 1 and lanes.split(1, 2) is split and not lanes.dropped
    finally:
        lanes.close()


def test_a_call_shape_the_lane_does_not_speed_up_goes_back_to_one_lane() -> None:
    lanes, store = tiny_lanes(ALL_CPU)
    try:
        split = lanes.split(1, 2)
        assert split is not None
        token = lanes.capture_token
        ids = torch.tensor([[3, 5]])
        resident = torch.arange(store.num_experts)  # every expert in a slot: nothing missed
        for _ in range(10):
            split(ids, resident)
        assert split.seen.tolist()[0] == 10
        lanes.round_trip_s = 1e-3  # the round trip of calls that had nothing to split
        lanes.observe(CpuLaneCounts(jobs=ADAPT_EVERY_JOBS, idle_jobs=ADAPT_EVERY_JOBS,
                                    busy_seconds=ADAPT_EVERY_JOBS * 1e-5,
                                    idle_busy_seconds=ADAPT_EVERY_JOBS * 1e-5))
        assert lanes.split(1, 2) is None and (1, 2) in lanes.dropped
        assert lanes.capture_token is not token  # captured steps are made again, one lane
    finally:
        lanes.close()


def test_a_lane_that_pays_keeps_its_split_and_its_captured_steps() -> None:
    lanes, store = tiny_lanes(ALL_CPU)
    try:
        split = lanes.split(1, 2)
        assert split is not None
        token = lanes.capture_token
        absent = torch.full((store.num_experts,), -1)
        for _ in range(10):
            split(torch.tensor([[3, 5]]), absent)  # both experts missed every call
        lanes.observe(CpuLaneCounts(jobs=ADAPT_EVERY_JOBS, experts=2 * ADAPT_EVERY_JOBS,
                                    tokens=2 * ADAPT_EVERY_JOBS,
                                    bytes=2 * ADAPT_EVERY_JOBS * store.layout.nbytes,
                                    busy_seconds=ADAPT_EVERY_JOBS * 1e-6))
        assert lanes.split(1, 2) is split and lanes.capture_token is token
        assert split.seen.tolist() == [0, 0, 0]  # taken
    finally:
        lanes.close()


def test_the_calibration_reads_experts_the_calls_before_did_not() -> None:
    layout = ExpertLayout(8, 16, torch.float32)
    blocks = torch.zeros(32, layout.nbytes // 4)
    seen: list[list[int]] = []

    def kernel(blocks: torch.Tensor, layout: ExpertLayout, hidden: torch.Tensor,
               ids: torch.Tensor, weights: torch.Tensor, on_cpu: torch.Tensor,
               out: torch.Tensor) -> None:
        seen.append(on_cpu.nonzero().view(-1).tolist())

    kernel.name = "fake"  # type: ignore[attr-defined]
    timing = time_cpu_kernel(kernel, blocks, layout, experts=4, repeats=5)  # type: ignore[arg-type]
    assert timing.name == "fake" and len(seen) == 6
    timed = seen[1:]
    assert all(len(x) == 4 for x in seen)
    assert len({e for x in timed for e in x}) == 20  # five calls, twenty distinct experts


def test_host_flags_hand_over_between_threads_without_the_gil() -> None:
    go, finished = HostFlag(torch.device("cpu")), HostFlag(torch.device("cpu"))
    seen: list[int] = []

    def worker() -> None:
        while (value := go.take()) > 0:
            seen.append(value)
            finished.set(value)

    thread = threading.Thread(target=worker)
    thread.start()
    for value in range(1, 200):
        go.set(value)
        assert finished.take() == value  # taking resets the word: the next take waits again
        assert int(finished.word[0]) == 0
    go.set(-1)
    thread.join(timeout=5)
    assert not thread.is_alive() and seen == list(range(1, 200))


@pytest.mark.parametrize("handover", ["flags", "host_functions"])
def test_both_hand_overs_run_jobs_in_order_and_stop(handover: str) -> None:
    signals = lane_signals(handover, torch.device("cpu"))
    assert signals.name == handover
    taken: list[int] = []

    def worker() -> None:
        while (job := signals.take()) != STOP:
            taken.append(job)
            signals.done(job)

    thread = threading.Thread(target=worker)
    thread.start()
    for job in [0, 3, 3, 1, 0]:
        signals.register(job)
        signals.start(job)
        signals.wait(job)
    signals.stop()
    thread.join(timeout=5)
    assert not thread.is_alive() and taken == [0, 3, 3, 1, 0]


def test_an_unknown_hand_over_is_refused_before_anything_is_measured() -> None:
    with pytest.raises(ValueError, match="handover must be one of auto, flags, host_functions"):
        offloaded(tiny_model_path(), ALL_CPU, num_slots=4, handover="pigeons")
    assert lane_signals("auto", torch.device("cpu")).name == "host_functions"


def test_two_lane_decode_over_host_flags_gives_the_resident_greedy_tokens() -> None:
    ids = torch.tensor([[1, 400, 37, 901, 12, 77, 5]])
    expected = load_model(tiny_model_path(), dtype="float32").generate(
        ids, max_new_tokens=10, eos_token_id=[])
    model, runtime = offloaded(tiny_model_path(), BALANCED, num_slots=6, handover="flags")
    try:
        assert runtime.two_lanes is not None
        assert runtime.two_lanes.lane.signals.name == "flags"
        assert torch.equal(model.generate(ids, max_new_tokens=10, eos_token_id=[]), expected)
        stats = runtime.snapshot()
    finally:
        runtime.close()
    assert stats.cpu_experts > 0 and stats.misses > 0


def test_host_semaphores_hand_over_between_threads_without_the_gil() -> None:
    ready, done = HostSemaphore(), HostSemaphore()
    seen: list[int] = []

    def worker() -> None:
        for _ in range(3):
            ready.wait()
            seen.append(len(seen))
            done.post()

    thread = threading.Thread(target=worker)
    thread.start()
    for i in range(3):
        ready.post()
        done.wait()
        assert seen == list(range(i + 1))
    thread.join(timeout=5)
    assert not thread.is_alive()


def offloaded(folder: Path, rates: LaneRates, num_slots: int,
              handover: str = "auto") -> tuple[MoEForCausalLM, OffloadRuntime]:
    model = load_model(folder, dtype="float32")
    store = HostExpertStore.from_model(model, pin=False)
    pool = GpuSlotPool(store.layout, num_slots, device="cpu")
    runtime = install_offloading(model, store, pool, CpuCopyEngine(), fetch="mapped",
                                 two_lanes=True, lane_rates=rates, drop_local_experts=True,
                                 handover=handover)
    runtime.prefetch(store.experts()[:num_slots])
    runtime.drain()
    return model, runtime


def test_the_lane_decision_reads_the_caches_residency_not_the_pools_size() -> None:
    # A pool that could hold every expert but holds none yet: every call misses, so the lane
    # pays by the model despite its 0.1 ms per call (the pool's size alone would say none
    # misses); once every expert is in its slot, a new call shape is declined.
    rates = LaneRates(gpu_bytes_per_s=1e7, cpu_bytes_per_s=1e13, cpu_fixed_s=1e-4)
    model = load_model(tiny_model_path(), dtype="float32")
    store = HostExpertStore.from_model(model, pin=False)
    pool = GpuSlotPool(store.layout, len(store.experts()), device="cpu")
    runtime = install_offloading(model, store, pool, CpuCopyEngine(), fetch="mapped",
                                 two_lanes=True, lane_rates=rates, drop_local_experts=True)
    lanes = runtime.two_lanes
    assert lanes is not None
    try:
        with torch.no_grad():
            model(torch.tensor([[5]]))
        assert lanes.split(1, 2) is not None and not lanes.declined
        assert runtime.snapshot().cpu_experts > 0
        runtime.prefetch(store.experts())
        runtime.drain()
        assert lanes.split(2, 2) is None and lanes.declined == {(2, 2)}
        assert runtime.summary()["lanes_declined_shapes"] == 1
    finally:
        runtime.close()


def test_a_capture_warm_up_makes_every_layers_lane_job_even_where_all_is_cached() -> None:
    # On the H200 a fully cached layer first reached the lane inside the capture, whose
    # host copy of the new job's id failed it: the warm-up now makes them all.
    probe = load_model(tiny_model_path(), dtype="float32")
    every = len(probe.moe_blocks()) * probe.spec.moe.num_experts
    model, runtime = offloaded(tiny_model_path(), ALL_CPU, num_slots=every)
    lanes, cache = runtime.two_lanes, runtime.cache
    assert lanes is not None and cache is not None
    ids = torch.tensor([[1]])
    try:
        with torch.no_grad():
            model(ids)  # not a warm-up: the complete layers do not touch the lane
        assert not lanes.lane._by_shape
        cache.before_warmup()
        with torch.no_grad():
            model(ids)
        cache.after_warmup()
        top_k = probe.spec.moe.router.top_k
        layers = {block.layer for block in model.moe_blocks()}
        assert {layer for layer, _, _ in lanes.lane._by_shape} == layers
        assert all(key == (1, top_k) for key in lanes._splits)
    finally:
        runtime.close()


def test_the_cpu_lane_uses_of_a_capture_warm_up_are_forgotten_with_the_rest() -> None:
    # Before a capture the decode runner runs eager warm-up steps and the cache forgets their
    # uses; the CPU lane's share of them must go too (it used to be moved out of misses that
    # were never counted: -22 misses on the H200).
    model, runtime = offloaded(tiny_model_path(), ALL_CPU, num_slots=4)
    cache = runtime.cache
    assert cache is not None
    ids = torch.tensor([[1, 400, 37, 901]])
    try:
        cache.before_warmup()
        model(ids)
        cache.after_warmup()
        warm = runtime.snapshot()
        assert warm.cpu_experts == 0 and warm.misses == 0 and warm.hits == 0
        model(ids)
        stats = runtime.snapshot()
        assert stats.cpu_experts > 0 and stats.misses >= 0
    finally:
        runtime.close()


@pytest.mark.parametrize("rates", [ALL_CPU, BALANCED], ids=["all_cpu", "balanced"])
def test_two_lane_decode_gives_the_resident_greedy_tokens(folder: Path, rates: LaneRates) -> None:
    vocab = load_model(folder, dtype="float32").spec.vocab_size
    ids = torch.randint(3, vocab, (1, 7), generator=torch.Generator().manual_seed(1))
    expected = load_model(folder, dtype="float32").generate(ids, max_new_tokens=10,
                                                            eos_token_id=[])
    model, runtime = offloaded(folder, rates, num_slots=6)
    try:
        assert torch.equal(model.generate(ids, max_new_tokens=10, eos_token_id=[]), expected)
        stats = runtime.snapshot()
    finally:
        runtime.close()
    nbytes = runtime.store.layout.nbytes
    assert stats.cpu_experts > 0 and stats.cpu_bytes == stats.cpu_experts * nbytes
    if rates is ALL_CPU:
        assert stats.misses == 0  # every miss was computed by the CPU lane
    else:
        assert stats.misses > 0  # both lanes worked
    assert stats.mapped_bytes == stats.misses * runtime.store.layout.nbytes
    assert stats.cpu_tokens >= stats.cpu_experts


def test_the_cli_decodes_over_two_lanes_and_refuses_them_without_the_mapped_fetch(
        capsys: pytest.CaptureFixture[str]) -> None:
    from moe_core.cli import app
    from typer.testing import CliRunner

    base = ["generate", "-p", "Once upon a time", "--max-new-tokens", "6", "--json"]
    plain = CliRunner().invoke(app, base)
    two = CliRunner().invoke(app, [*base, "--expert-memory", "2MiB", "--fetch", "mapped",
                                   "--lanes", "2", "--cpu-kernel", "numba", "--stats"])
    assert plain.exit_code == 0 and two.exit_code == 0, two.output
    assert two.stdout == plain.stdout
    assert "cpu_gb_per_s" in two.stderr
    bad = CliRunner().invoke(app, [*base, "--expert-memory", "2MiB", "--lanes", "2"])
    assert bad.exit_code == 1 and bad.stderr.strip() == (
        "error: --lanes 2 needs --fetch mapped (and --expert-memory)")


@pytest.mark.parametrize("handover", ["flags", "host_functions"])
def test_a_failing_cpu_lane_raises_on_the_host_and_never_hangs(handover: str) -> None:
    model, runtime = offloaded(tiny_model_path(), ALL_CPU, num_slots=4, handover=handover)
    assert runtime.two_lanes is not None

    def broken(*args: object) -> None:
        raise MemoryError("simulated")

    runtime.two_lanes.lane.kernel = broken  # type: ignore[assignment]
    started = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match=r"CPU expert lane failed.*simulated"):
            model(torch.tensor([[5, 6, 7]]))
    finally:
        runtime.close()
    assert time.monotonic() - started < 30


def cuda_offloaded(dtype: str, rates: LaneRates, num_slots: int,
                   handover: str = "auto") -> tuple[MoEForCausalLM, OffloadRuntime]:
    from moe_core.offload.copy_engines import make_copy_engine

    model = load_model(tiny_model_path(), device="cuda", dtype=dtype)
    store = HostExpertStore.from_model(model, pin=True)
    pool = GpuSlotPool(store.layout, num_slots, device="cuda")
    runtime = install_offloading(model, store, pool, make_copy_engine("cuda"), fetch="mapped",
                                 two_lanes=True, lane_rates=rates, drop_local_experts=True,
                                 handover=handover)
    runtime.prefetch(store.experts()[:num_slots])
    runtime.drain()
    return model, runtime


@pytest.mark.gpu
@pytest.mark.parametrize("handover", ["flags", "host_functions"])
@pytest.mark.parametrize("rates", [ALL_CPU, BALANCED], ids=["all_cpu", "balanced"])
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "captured"])
def test_cuda_two_lane_decode_gives_the_resident_greedy_tokens(rates: LaneRates, graphs: bool,
                                                               handover: str) -> None:
    """float32 on CUDA (both lanes then compute what the resident model computes, up to the
    order of additions): the resident greedy tokens, eager and through captured steps, and
    every CPU-lane use counted in both."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("cupy")
    ids = torch.tensor([[1, 400, 37, 901, 12, 77, 5]], device="cuda")
    resident = load_model(tiny_model_path(), device="cuda", dtype="float32")
    expected = resident.generate(ids, max_new_tokens=24, eos_token_id=[], graphs=False)
    model, runtime = cuda_offloaded("float32", rates, num_slots=8, handover=handover)
    try:
        assert runtime.two_lanes is not None
        assert runtime.two_lanes.lane.signals.name == handover
        got = model.generate(ids, max_new_tokens=24, eos_token_id=[], graphs=graphs)
        stats = runtime.snapshot(block=True)
        if graphs:
            runner = model.decode_runner(1, 64)
            assert runner.use_graphs and runner._graphs  # the two-lane step was captured
    finally:
        model.release_decode_runner()
        runtime.close()
    assert got.tolist() == expected.tolist()
    assert stats.cpu_experts > 0 and stats.misses >= 0
    assert stats.mapped_bytes == stats.misses * runtime.store.layout.nbytes
    if rates is ALL_CPU:
        assert stats.misses == 0


@pytest.mark.gpu
def test_cuda_two_lane_bf16_logits_stay_close_to_resident() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("cupy")
    ids = torch.randint(3, 900, (1, 16), generator=torch.Generator().manual_seed(2)).cuda()
    resident = load_model(tiny_model_path(), device="cuda", dtype="bfloat16")
    for block in resident.moe_blocks():
        block.experts.device_kernels = False
    with torch.no_grad():
        want = resident(ids).float()
    model, runtime = cuda_offloaded("bfloat16", BALANCED, num_slots=8)
    try:
        with torch.no_grad():
            got = model(ids).float()
        stats = runtime.snapshot(block=True)
    finally:
        runtime.close()
    assert stats.cpu_experts > 0
    scale = want.abs().max()
    far = ((got - want).abs() > 2e-2 * (scale + want.abs())).any(dim=-1)
    assert int(far.sum()) <= max(1, far.numel() // 16)  # a near-tied routing may flip


def test_closing_the_runtime_returns_every_miss_to_the_gpu_lane() -> None:
    model, runtime = offloaded(tiny_model_path(), ALL_CPU, num_slots=4)
    lanes = runtime.two_lanes
    assert lanes is not None
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = model(ids)
    keys = [ex.capture_key for ex in runtime.executors.values()]  # type: ignore[attr-defined]
    runtime.close()
    assert runtime.two_lanes is None and all(k is lanes.capture_token for k in keys)
    assert all(ex.capture_key is None for ex in runtime.executors.values())  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match="closed"):
        lanes.lane.start(lanes.lane.job(1, 1, 2), torch.zeros(1, 4), torch.zeros(1, 2,
                         dtype=torch.long), torch.zeros(1, 2), torch.zeros(8, dtype=torch.bool))
    with torch.no_grad():
        after = model(ids)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    stats = runtime.snapshot()
    assert stats.misses > 0 and stats.cpu_experts > 0


@pytest.mark.gpu
def test_cuda_host_flags_hand_over_from_a_captured_graph_on_every_replay() -> None:
    """The stream's memory operations, captured: each replay hands the staged value to a
    worker thread, waits for its answer, and copies it back; nothing is lost or reused."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    signals = lane_signals("flags", torch.device("cuda"))
    staged = torch.zeros(1, device="cuda")
    host_in = torch.zeros(1, pin_memory=True)
    host_out = torch.zeros(1, pin_memory=True)

    def worker() -> None:
        while (job := signals.take()) != STOP:
            host_out[0] = host_in[0] * 2 + job
            signals.done(job)

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        stream = torch.cuda.Stream()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream):
            with torch.cuda.graph(graph, stream=stream):
                host_in.copy_(staged, non_blocking=True)
                signals.start_on_stream(stream.cuda_stream, 7)
                signals.wait_on_stream(stream.cuda_stream, 7)
                result = host_out.to("cuda", non_blocking=True) + 1
        for value in range(5):
            staged.fill_(value)
            graph.replay()
            assert float(result) == value * 2 + 7 + 1
    finally:
        signals.stop()
        thread.join(timeout=10)
    assert not thread.is_alive()
