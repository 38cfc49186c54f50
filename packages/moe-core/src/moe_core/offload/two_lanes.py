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
tables, so they follow too). A CPU lane that does not pay gets fewer experts, down to none; and
since every call through the lane pays its round trip (the hand-over both ways, `lane_signals`,
and the worker's own work), a call shape whose calls the lane did not speed up, by the model over the misses
those calls actually had (`lane_saving`), is dropped to one lane (`capture_token` changes, so
the decode runner captures its steps again without the lane).
"""

from __future__ import annotations

import time
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
from moe_core.offload.lane_split import LaneRates, LaneSplit, cpu_share_table, lane_saving
from moe_core.offload.mapped_fetch import MappedFetcher

__all__ = ["ADAPT_EVERY_JOBS", "LaneCalibration", "TwoLanes", "calibrate_lanes",
           "two_lanes_unsupported"]

_DEFAULT_GPU_RATE = 48e9
"""Mapped reads of pinned host memory on the H200 (decision 0004), when not measured (CPU)."""

ADAPT_EVERY_JOBS = 96
"""CPU-lane layer calls between re-fits of its rates (a few decode steps)."""


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
    """

    def __init__(self, store: HostExpertStore, pool: GpuSlotPool,
                 calibration: LaneCalibration, *, measure_round_trip: bool = False,
                 top_k: int = 1, handover: str = "auto") -> None:
        reason = two_lanes_unsupported(pool, handover)
        if reason is not None:
            raise RuntimeError(f"two-lane decode unavailable: {reason}")
        self.lane = CpuLane(store, calibration.kernel, pool.device, handover)
        self._store = store
        self._device = pool.device
        self._splits: dict[tuple[int, int], LaneSplit | None] = {}
        self._seen = CpuLaneCounts()
        self.dropped: set[tuple[int, int]] = set()  # shapes whose lane did not pay
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

    def split(self, tokens: int, top_k: int) -> LaneSplit | None:
        """The device split of one call shape (made on first use); None when the cost model
        never gives the CPU an expert at this shape (the call then uses the GPU lane alone)."""
        key = (tokens, top_k)
        if key not in self._splits:
            table = self._table(tokens, top_k, self.rates)
            self._splits[key] = LaneSplit(table, self._store.num_experts, self._device) \
                if any(table) else None
        return self._splits[key]

    def observe(self, counts: CpuLaneCounts) -> None:
        """The lane's counts since the last ones (the cache passes each it takes). Every
        `ADAPT_EVERY_JOBS` layer calls: re-fit the CPU lane's fixed cost (its calls with no
        expert) and rate (the rest, per expert byte, token growth as calibrated), and rewrite
        the splits' tables with them. Never inside a capture (it waits for the device)."""
        seen = self._seen = self._seen.plus(counts)
        if seen.jobs < ADAPT_EVERY_JOBS or (
                self._device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
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
            table = split.cpu_share  # the table these calls were split by
            saving = lane_saving(self.rates, self._store.layout.nbytes, table, split.take_seen(),
                                 self.round_trip_s)
            if saving < 0:  # the GPU alone would have been faster: this shape goes one lane
                self._splits[(tokens, top_k)] = None
                self.dropped.add((tokens, top_k))
                self.capture_token = object()  # steps captured with the lane are re-captured
                continue
            split.update(self._table(tokens, top_k, self.rates))

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
