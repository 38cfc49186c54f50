"""Two-lane decode: a layer call's missed experts split between the GPU's mapped reads over PCIe
and the CPU lane, both running at once, their results added on the GPU.

Dimension key: T tokens, K experts per token, D hidden, E experts per layer.

Per call (few tokens, the mapped path of `OffloadedExecutor`): the device splits the misses
(`LaneSplit`) and the CPU lane is staged and started (`start`); the executor's GPU lane reads
its misses and its resident experts and computes them (the CPU's experts marked -2 in its table,
read as zero rows); the stream waits for the CPU lane and adds its result (`finish`). Nothing
reads the routing on the host, so the call is captured in a CUDA graph like the one-lane mapped
path.

`calibrate_lanes` measures both lanes on the store at start-up (a few milliseconds): the CPU
kernel's rate (and which kernel, `choose_cpu_kernel`) and the GPU's mapped-read rate. The CPU
lane then runs beside a thread launching the GPU's work, on weights no cache holds, and was
measured on the H200 machine 5.6x slower than its calibration (decision 0009): so `observe`
re-fits the CPU lane's rate and fixed cost from how the lane actually ran, every
`ADAPT_EVERY_JOBS` layer calls, and rewrites every split's table (captured steps read the same
tables, so they follow too). A CPU lane that does not pay gets fewer experts, down to none.

Every call through the lane pays its round trip (the hand-over both ways, `lane_signals`, and
the worker's own work) on the stream's critical path, whatever the split gives the CPU:
`call_cost_s`, at least the round trip measured at start-up. So a call shape takes the lane
only when it pays by the model (`lane_split`), decided twice:

- when the shape is first split, before any of its calls ran: over the misses per call expected
  from the cache's residency then (`absent_experts`, uniform routing), a shape that would not
  save `MIN_SAVING_SHARE` of its per-call cost per call is declined (`declined`): its calls,
  captured ones included, never touch the lane. FP8 experts at 92% cached decline here;
- from its calls' actual misses (counted on the device, `LaneSplit.seen`): at every
  observation, a shape that lost more than `CLEAR_LOSS_SHARE` of its per-call cost per call
  over at least `EARLY_DROP_CALLS` calls, and at each re-fit one that saved nothing, is dropped
  to one lane (`dropped`; `capture_token` changes, so the decode runner captures its steps
  again without the lane). Declined and dropped shapes are not tried again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from moe_core.offload.cpu_experts import (
    CpuExpertKernel,
    KernelTiming,
    choose_cpu_kernel,
    cpu_kernels,
    time_cpu_kernel,
)
from moe_core.offload.cpu_lane import CpuLane, CpuLaneCounts, LaneJob
from moe_core.offload.gpu_slots import GpuSlotPool
from moe_core.offload.host_store import HostExpertStore
from moe_core.offload.lane_signals import lane_signals_unsupported
from moe_core.offload.lane_split import (
    MIN_SAVING_SHARE,
    LaneRates,
    LaneSplit,
    cpu_share_table,
    expected_saving,
    expected_tokens_per_expert,
    lane_saving,
)
from moe_core.offload.mapped_fetch import MappedFetcher

__all__ = ["ADAPT_EVERY_JOBS", "CLEAR_LOSS_SHARE", "EARLY_DROP_CALLS", "LaneCalibration",
           "TwoLanes", "calibrate_lanes", "two_lanes_unsupported"]

_DEFAULT_GPU_RATE = 48e9
"""Mapped reads of pinned host memory on the H200 (decision 0004), when not measured (CPU)."""

ADAPT_EVERY_JOBS = 96
"""CPU-lane layer calls between re-fits of its rates (a few decode steps)."""

EARLY_DROP_CALLS = 24
"""Calls of a shape after which any observation may drop its lane as a clear loss (one decode
step of a 24-layer model), without waiting for a re-fit."""

CLEAR_LOSS_SHARE = 0.5
"""A shape whose lane lost more than this share of its per-call cost per call is a clear loss."""


def two_lanes_unsupported(pool: GpuSlotPool, handover: str = "auto") -> str | None:
    """Why two-lane decode cannot run for `pool`'s device with `handover`, or None."""
    return lane_signals_unsupported(handover, pool.device)


@dataclass(frozen=True)
class LaneCalibration:
    """What `calibrate_lanes` measured.

    Attributes:
        rates: The split's cost-model inputs.
        kernel: The CPU kernel chosen.
        timings: Every CPU kernel's timing at one token (the choice was made on these).
        gpu_measured: Whether the GPU rate was measured (False: the default for the device).
    """

    rates: LaneRates
    kernel: CpuExpertKernel
    timings: list[KernelTiming]
    gpu_measured: bool

    def summary(self) -> dict[str, float | str | bool]:
        """JSON-ready: the rates in GB/s, the kernel and each candidate's GB/s."""
        out: dict[str, float | str | bool] = {
            "gpu_gb_per_s": self.rates.gpu_bytes_per_s / 1e9,
            "cpu_gb_per_s": self.rates.cpu_bytes_per_s / 1e9,
            "cpu_fixed_us": self.rates.cpu_fixed_s * 1e6,
            "cpu_token_cost": self.rates.cpu_token_cost,
            "cpu_kernel": self.kernel.name,
            "gpu_measured": self.gpu_measured,
        }
        for timing in self.timings:
            out[f"cpu_{timing.name}_gb_per_s"] = timing.gb_per_s
        return out


def calibrate_lanes(store: HostExpertStore, pool: GpuSlotPool, kernel: str = "auto",
                    experts: int = 4) -> LaneCalibration:
    """Measure the two lanes on `store`'s first MoE layer.

    Args:
        store: The host tier.
        pool: The device slots (their device's mapped reads are timed on CUDA).
        kernel: `"auto"` (the fastest CPU kernel), or a kernel's name (`"torch"`, `"numba"`).
        experts: Experts per timed call (the misses of one layer call, typically).

    Raises:
        ValueError: an unknown or unavailable kernel name.
    """
    layer = store.moe_layers[0]
    blocks = store.arena(layer).view(store.num_experts, -1)
    candidates = cpu_kernels()
    if kernel != "auto":
        named = [k for k in candidates if k.name == kernel]
        if not named:
            raise ValueError(f"CPU expert kernel {kernel!r} is not available here (have: "
                             f"{', '.join(k.name for k in candidates)})")
        candidates = named
    chosen, timings = choose_cpu_kernel(blocks, store.layout, candidates, experts)
    one = next(t for t in timings if t.name == chosen.name)
    four = time_cpu_kernel(chosen, blocks, store.layout, experts, tokens=4)
    token_cost = max(0.0, (four.seconds / one.seconds - 1.0) / 3.0)
    gpu_rate, measured = _DEFAULT_GPU_RATE, False
    if pool.device.type == "cuda":
        gpu_rate, measured = _mapped_rate(store, pool, layer, experts), True
    rates = LaneRates(gpu_bytes_per_s=gpu_rate, cpu_bytes_per_s=one.gb_per_s * 1e9,
                      cpu_token_cost=token_cost)
    return LaneCalibration(rates, chosen, timings, measured)


def _spread_absent(store: HostExpertStore, pool: GpuSlotPool) -> list[int]:
    """Per MoE layer, its experts in no slot when the pool's slots are spread evenly over the
    layers and all filled (what a full cache holds under uniform routing)."""
    layers, e = len(store.moe_layers), store.num_experts
    each, extra = divmod(pool.num_slots, layers)
    return [e - min(e, each + (i < extra)) for i in range(layers)]


def _mapped_rate(store: HostExpertStore, pool: GpuSlotPool, layer: int, experts: int) -> float:
    """Bytes per second of the GPU reading `experts` absent experts from host memory."""
    fetcher = MappedFetcher(store, pool)
    ids = torch.arange(experts, device=pool.device)
    lut = torch.full((store.num_experts,), -1, dtype=torch.long, device=pool.device)
    fetcher.fetch_rows(layer, ids, lut, distinct=True)  # compiles the kernel
    torch.cuda.synchronize(pool.device)
    start = time.perf_counter()
    repeats = 5
    for _ in range(repeats):
        fetcher.fetch_rows(layer, ids, lut, distinct=True)
    torch.cuda.synchronize(pool.device)
    return experts * store.layout.nbytes * repeats / (time.perf_counter() - start)


class TwoLanes:
    """The two-lane path of the on-demand executors of one runtime (shared by every layer).

    Attributes:
        lane: The CPU lane (worker thread, pinned job buffers).
        calibration: The measured rates and the CPU kernel.
        declined: Call shapes `(T, K)` the model gave no lane at their first call (one lane).
        dropped: Call shapes whose lane did not pay in the calls it served (one lane since).
        expected_saving_s: Per call shape, the seconds per call the lane was expected to save
            when the shape was first split (negative: expected to lose).
    """

    def __init__(self, store: HostExpertStore, pool: GpuSlotPool,
                 calibration: LaneCalibration, *, measure_round_trip: bool = False,
                 top_k: int = 1, handover: str = "auto",
                 absent_experts: Callable[[], Sequence[int]] | None = None) -> None:
        """`absent_experts()`: per MoE layer of `store`, its experts in no slot now (the
        cache's residency, asked when a call shape is first split); None: the pool's slots
        spread evenly over the layers, each full."""
        reason = two_lanes_unsupported(pool, handover)
        if reason is not None:
            raise RuntimeError(f"two-lane decode unavailable: {reason}")
        self.lane = CpuLane(store, calibration.kernel, pool.device, handover)
        self._store = store
        self._device = pool.device
        self._absent_experts = absent_experts or (lambda: _spread_absent(store, pool))
        self._splits: dict[tuple[int, int], LaneSplit | None] = {}
        self._calls: dict[tuple[int, int], list[int]] = {}  # seen[m] since the last re-fit
        self._seen = CpuLaneCounts()
        self._unchecked_jobs = 0  # lane jobs since the splits' counts were last taken
        self.declined: set[tuple[int, int]] = set()
        self.dropped: set[tuple[int, int]] = set()
        self.expected_saving_s: dict[tuple[int, int], float] = {}
        self.capture_token = object()  # replaced when a shape's lane is dropped
        self.round_trip_s = self._round_trip(top_k) if measure_round_trip else 0.0
        if measure_round_trip:  # the lane's fixed cost as the stream sees it
            calibration = replace(calibration, rates=replace(
                calibration.rates, cpu_fixed_s=max(calibration.rates.cpu_fixed_s,
                                                   self.round_trip_s)))
        self.calibration = calibration
        self.rates = calibration.rates  # what the splits use: calibrated, then observed
        self.refits = 0

    def _round_trip(self, top_k: int, calls: int = 32) -> float:
        """Seconds per layer call the stream spends on a lane job with nothing to compute:
        the staging copies, the hand-over both ways and the worker's own work (~0.4 ms on the
        H200 machine through host functions, decision 0009; the worker alone sees a fraction
        of it)."""
        device, d = self._device, self._store.layout.hidden_size
        job = self.lane.job(self._store.moe_layers[0], 1, top_k)
        hidden = torch.zeros(1, d, device=device)
        ids = torch.zeros(1, top_k, dtype=torch.long, device=device)
        weights = torch.zeros(1, top_k, device=device)
        on_cpu = torch.zeros(self._store.num_experts, dtype=torch.bool, device=device)
        times = []
        for _ in range(3):
            self._sync()
            start = time.perf_counter()
            for _ in range(calls):
                self.lane.start(job, hidden, ids, weights, on_cpu)
                self.lane.finish(job)
            self._sync()
            times.append((time.perf_counter() - start) / calls)
        self.lane.take_counts()  # not decode's
        return sorted(times)[1]

    def _sync(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    @property
    def call_cost_s(self) -> float:
        """Seconds every call through the lane costs the stream, whatever its split gives the
        CPU: the measured round trip, or the lane's fixed cost where that is larger (the
        worker's own part, re-fitted; or the given rates' when nothing was measured)."""
        return max(self.round_trip_s, self.rates.cpu_fixed_s)

    def split(self, tokens: int, top_k: int) -> LaneSplit | None:
        """The device split of one call shape, made on first use; None when the shape takes no
        lane (the call then uses the GPU lane alone): declined at first use, its table never
        giving the CPU an expert or the lane not expected to save `MIN_SAVING_SHARE` of its
        per-call cost per call over the misses the cache's residency gives (`declined`); or
        dropped since (`dropped`)."""
        key = (tokens, top_k)
        if key not in self._splits:
            self._splits[key] = self._first_split(tokens, top_k)
        return self._splits[key]

    def _first_split(self, tokens: int, top_k: int) -> LaneSplit | None:
        """The split of a shape no call has used yet, or None where the model declines it."""
        e = self._store.num_experts
        table = self._table(tokens, top_k, self.rates)
        saving = expected_saving(self.rates, self._store.layout.nbytes, self._absent_experts(),
                                 e, tokens, top_k, self.call_cost_s)
        self.expected_saving_s[(tokens, top_k)] = saving
        if not any(table) or saving < MIN_SAVING_SHARE * self.call_cost_s:
            self.declined.add((tokens, top_k))
            return None
        return LaneSplit(table, e, self._device)

    def _saving(self, tokens: int, top_k: int, table: list[int],
                calls: Sequence[float]) -> float:
        """Seconds per call the lane saves (by the model, at the current rates) over `calls`
        (`calls[m]`: calls, or their share, with m misses) split by `table`."""
        per_expert = expected_tokens_per_expert(self._store.num_experts, tokens, top_k)
        return lane_saving(self.rates, self._store.layout.nbytes, table, calls,
                           self.call_cost_s, tokens_per_expert=per_expert)

    def observe(self, counts: CpuLaneCounts) -> None:
        """The lane's counts since the last ones (the cache passes each it takes).

        Once `EARLY_DROP_CALLS` more jobs ran: take every split's counts of misses and drop
        the shapes that clearly lose (`CLEAR_LOSS_SHARE`). Every `ADAPT_EVERY_JOBS` layer
        calls: re-fit the CPU lane's fixed cost (its calls with no expert) and rate (the rest,
        per expert byte, token growth as calibrated), drop the shapes that saved nothing over
        the calls since the last re-fit and rewrite the others' tables. Never inside a capture
        (it waits for the device)."""
        seen = self._seen = self._seen.plus(counts)
        self._unchecked_jobs += counts.jobs
        if (self._unchecked_jobs < EARLY_DROP_CALLS and seen.jobs < ADAPT_EVERY_JOBS) or (
                self._device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            return  # (reading the splits' counts waits for the device: not every flush)
        self._unchecked_jobs = 0
        self._take_calls()
        self._drop_clear_losses()
        if seen.jobs < ADAPT_EVERY_JOBS:
            return
        self._seen = CpuLaneCounts()
        rates = self.rates
        # The worker sees only part of a call's fixed cost (its own, from its calls with
        # nothing to compute); the split uses no less than the stream's round trip.
        worker_fixed = seen.idle_busy_seconds / seen.idle_jobs if seen.idle_jobs else 0.0
        fixed = max(worker_fixed, self.round_trip_s) if seen.idle_jobs else rates.cpu_fixed_s
        working = seen.jobs - seen.idle_jobs
        cpu_rate = rates.cpu_bytes_per_s
        if working and seen.bytes:
            per_expert = seen.tokens / max(seen.experts, 1)
            growth = 1 + rates.cpu_token_cost * max(per_expert - 1, 0.0)
            spent = seen.busy_seconds - seen.idle_busy_seconds - working * worker_fixed
            # never faster than calibrated (a call's fixed part may exceed the idle calls')
            cpu_rate = seen.bytes * growth / max(
                spent, seen.bytes * growth / self.calibration.rates.cpu_bytes_per_s)
        self.rates = LaneRates(gpu_bytes_per_s=rates.gpu_bytes_per_s, cpu_bytes_per_s=cpu_rate,
                               cpu_fixed_s=fixed, cpu_token_cost=rates.cpu_token_cost)
        self.refits += 1
        for (tokens, top_k), split in list(self._splits.items()):
            if split is None:
                continue
            calls = self._calls.pop((tokens, top_k), [])
            table = split.cpu_share  # the table these calls were split by
            if self._saving(tokens, top_k, table, calls) < 0:  # the GPU alone was faster
                self._drop((tokens, top_k))
                continue
            split.update(self._table(tokens, top_k, self.rates))

    def _take_calls(self) -> None:
        """Add every split's device counts of misses per call to those since the last re-fit
        (one host read per split)."""
        for key, split in self._splits.items():
            if split is not None:
                seen = split.take_seen()
                calls = self._calls.setdefault(key, [0] * len(seen))
                self._calls[key] = [a + b for a, b in zip(calls, seen, strict=True)]

    def _drop_clear_losses(self) -> None:
        """Drop, without waiting for a re-fit, the shapes whose lane lost more than
        `CLEAR_LOSS_SHARE` of its per-call cost per call over at least `EARLY_DROP_CALLS`
        calls (FP8 experts mostly cached: calls with no miss pay the whole round trip)."""
        for (tokens, top_k), split in list(self._splits.items()):
            calls = self._calls.get((tokens, top_k), [])
            if split is None or sum(calls) < EARLY_DROP_CALLS:
                continue
            saving = self._saving(tokens, top_k, split.cpu_share, calls)
            if saving < -CLEAR_LOSS_SHARE * self.call_cost_s:
                self._drop((tokens, top_k))

    def _drop(self, key: tuple[int, int]) -> None:
        """One lane for this shape from now on; steps captured with the lane are captured
        again (`capture_token`)."""
        self._splits[key] = None
        self._calls.pop(key, None)
        self.dropped.add(key)
        self.capture_token = object()

    def _table(self, tokens: int, top_k: int, rates: LaneRates) -> list[int]:
        return cpu_share_table(rates, self._store.layout.nbytes, self._store.num_experts,
                               tokens, top_k)

    def start(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
              weights: torch.Tensor, lut: torch.Tensor,
              split: LaneSplit) -> tuple[LaneJob, torch.Tensor]:
        """Split one call's misses (`lut` `[E]`: resident slots, -1 absent) and start the CPU
        lane on its share; returns the job and the GPU lane's table (the CPU's experts -2)."""
        on_cpu, gpu_lut = split(expert_ids, lut)
        job = self.lane.job(layer, *expert_ids.shape)
        self.lane.start(job, hidden.float(), expert_ids, weights.float(), on_cpu)
        return job, gpu_lut

    def finish(self, job: LaneJob, gpu_out: torch.Tensor) -> torch.Tensor:
        """`[T, D]`: the GPU lane's result `gpu_out` plus the CPU lane's, once it is written."""
        return (gpu_out.float() + self.lane.finish(job)).to(gpu_out.dtype)

    def close(self) -> None:
        """Stop the CPU lane's worker."""
        self.lane.close()
