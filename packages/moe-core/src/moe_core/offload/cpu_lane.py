"""The CPU lane of two-lane decode: a worker thread that computes, for each MoE layer call, the
missed experts the split gave it, from the host store, while the GPU reads the others over PCIe.

Dimension key: T tokens, K experts per token, D hidden, E experts per layer.

Protocol per layer call (`LaneJob` holds one call shape's pinned buffers, `[T, ...]`):

1. the executor stages the call on the stream: the layer's input rows (float32), routing and
   the `[E]` CPU mask are copied device -> pinned host memory;
2. `start`: the stream hands the job to the worker once the copies have landed (`lane_signals`:
   a host flag the stream writes, or a semaphore a host function posts; on the CPU the host
   does it);
3. the worker, waiting without the GIL, takes the job, runs the CPU expert kernel into the job's
   pinned `out`, counts, and signals it done;
4. meanwhile the GPU computes its share; `finish`: the stream waits until the job is done, then
   copies `out` back and the executor adds it.

Layer calls are strictly ordered on one stream, so one pair of signals serves every job, in
eager steps and in replays of captured ones (a capture records the copies and the signals'
operations; nothing runs until a replay). A worker error is kept, the job is still signalled
done (the stream never hangs), and the error is raised on the host at the next `check`.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from dataclasses import astuple, dataclass

import numpy as np
import torch

from moe_core.offload.cpu_experts import CpuExpertKernel
from moe_core.offload.host_store import HostExpertStore
from moe_core.offload.lane_signals import STOP, LaneSignals, lane_signals

__all__ = ["CpuLane", "CpuLaneCounts", "LaneJob"]

_SPARE_CORES = 1
"""Cores the worker's parallel kernel leaves to the thread that launches the GPU's work (and
spins in its synchronisations): a kernel split statically over every core waits for its slowest
thread, and a thread that shares its core with a busy one is late by a scheduler time slice."""
_SWITCH_INTERVAL_S = 2e-4
"""The interpreter's thread switch interval while a lane runs (default 5 ms): the worker needs
the GIL for a few lines between its semaphore and its kernel, and an eager decode step keeps the
main thread busy launching kernels; without this the worker can wait up to 5 ms per layer."""


@dataclass
class CpuLaneCounts:
    """What the CPU lane computed since the counts were last taken.

    Attributes:
        experts: Expert uses computed (each distinct expert of a layer call once).
        tokens: Token-expert pairs computed.
        bytes: Expert bytes read from host memory (each expert's block once per call).
        seconds: Worker time spent in the kernel.
        jobs: Layer calls served (those the split gave no expert included).
        busy_seconds: Worker time from each wake-up to its `done` post (the kernel and the
            worker's own bookkeeping: what the stream waits for, less the host functions'
            dispatch).
        idle_jobs: Of `jobs`, those with no expert to compute.
        idle_busy_seconds: Of `busy_seconds`, those jobs' (the lane's fixed cost per call).
    """

    experts: int = 0
    tokens: int = 0
    bytes: int = 0
    seconds: float = 0.0
    jobs: int = 0
    busy_seconds: float = 0.0
    idle_jobs: int = 0
    idle_busy_seconds: float = 0.0

    def plus(self, other: CpuLaneCounts) -> CpuLaneCounts:
        """Both counts together."""
        return CpuLaneCounts(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))


@dataclass(eq=False)
class LaneJob:
    """The pinned host buffers of one (layer, tokens) call shape, and its device-side id.

    Attributes:
        index: The job's number (what the mailbox carries).
        layer: Decoder-layer index.
        hidden: `[T, D]` float32 input rows.
        ids: `[T, K]` int64 routing.
        weights: `[T, K]` float32 routing weights.
        on_cpu: `[E]` bool, the experts this lane computes.
        out: `[T, D]` float32 result.
    """

    index: int
    layer: int
    hidden: torch.Tensor
    ids: torch.Tensor
    weights: torch.Tensor
    on_cpu: torch.Tensor
    out: torch.Tensor


class CpuLane:
    """The worker thread and its jobs, for one host store and one compute device.

    Attributes:
        store: The host tier the kernel reads.
        kernel: The CPU expert kernel.
        device: The compute device (`cuda`: the stream signals; `cpu`: the host does).
        signals: The hand-over (`lane_signals`).
    """

    def __init__(self, store: HostExpertStore, kernel: CpuExpertKernel,
                 device: torch.device, handover: str = "auto") -> None:
        self.store = store
        self.kernel = kernel
        self.device = device
        self._pin = device.type == "cuda"
        self._jobs: list[LaneJob] = []
        self._by_shape: dict[tuple[int, int, int], LaneJob] = {}
        self.signals: LaneSignals = lane_signals(handover, device)
        self._counts = CpuLaneCounts()
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(self._switch_interval, _SWITCH_INTERVAL_S))
        self._thread = threading.Thread(target=self._run, name="moe-cpu-lane", daemon=True)
        self._thread.start()

    # The executor's side ----------------------------------------------------------------------

    def job(self, layer: int, tokens: int, top_k: int) -> LaneJob:
        """The job of this call shape (made on first use: before a capture, by its warm-up)."""
        key = (layer, tokens, top_k)
        job = self._by_shape.get(key)
        if job is None:
            d, e = self.store.layout.hidden_size, self.store.num_experts

            def host(*shape: int, dtype: torch.dtype) -> torch.Tensor:
                return torch.zeros(*shape, dtype=dtype, pin_memory=self._pin)

            index = len(self._jobs)
            job = LaneJob(index, layer, host(tokens, d, dtype=torch.float32),
                          host(tokens, top_k, dtype=torch.long),
                          host(tokens, top_k, dtype=torch.float32),
                          host(e, dtype=torch.bool), host(tokens, d, dtype=torch.float32))
            self.signals.register(index)
            self._jobs.append(job)
            self._by_shape[key] = job
        return job

    def start(self, job: LaneJob, hidden: torch.Tensor, ids: torch.Tensor,
              weights: torch.Tensor, on_cpu: torch.Tensor) -> None:
        """Stage one call (device tensors) into `job` and let the worker start on it when the
        copies have landed: on CUDA, enqueued on the current stream; on the CPU, at once.

        Raises:
            RuntimeError: the lane was closed, or its worker failed on an earlier call.
        """
        if not self._thread.is_alive():
            raise RuntimeError("the CPU expert lane was closed")
        self.check()
        if self.device.type == "cuda":
            stream = torch.cuda.current_stream(self.device).cuda_stream
            job.hidden.copy_(hidden, non_blocking=True)
            job.ids.copy_(ids, non_blocking=True)
            job.weights.copy_(weights, non_blocking=True)
            job.on_cpu.copy_(on_cpu, non_blocking=True)
            self.signals.start_on_stream(stream, job.index)
            return
        job.hidden.copy_(hidden)
        job.ids.copy_(ids)
        job.weights.copy_(weights)
        job.on_cpu.copy_(on_cpu)
        self.signals.start(job.index)

    def finish(self, job: LaneJob) -> torch.Tensor:
        """`[T, D]` float32 on the device: the lane's result for `job`, ordered after the
        worker finished (on CUDA the stream waits for it; on the CPU the host does)."""
        if self.device.type == "cuda":
            self.signals.wait_on_stream(torch.cuda.current_stream(self.device).cuda_stream,
                                        job.index)
            return job.out.to(self.device, non_blocking=True)
        self.signals.wait(job.index)
        self.check()
        return job.out.clone()

    def check(self) -> None:
        """Raise the worker's error, if it had one (once)."""
        error, self._error = self._error, None
        if error is not None:
            raise RuntimeError(f"the CPU expert lane failed: {error!r}") from error

    def take_counts(self) -> CpuLaneCounts:
        """What the lane computed since the last call (call when the device is idle, or after
        a synchronisation, for counts that match the uses counted so far)."""
        with self._lock:
            counts, self._counts = self._counts, CpuLaneCounts()
        return counts

    def close(self) -> None:
        """Stop the worker (after everything enqueued has run)."""
        if self._thread.is_alive():
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.signals.stop()
            self._thread.join()
            sys.setswitchinterval(self._switch_interval)

    # The worker -------------------------------------------------------------------------------

    def _run(self) -> None:
        _leave_cores_to_the_launcher()
        while True:
            index = self.signals.take()
            woke = time.perf_counter()
            if index == STOP:
                return
            job = self._jobs[index]
            try:
                on_cpu = job.on_cpu.numpy()
                experts = int(np.count_nonzero(on_cpu))
                start = time.perf_counter()
                if experts:
                    blocks = self.store.arena(job.layer).view(self.store.num_experts, -1)
                    self.kernel(blocks, self.store.layout, job.hidden, job.ids, job.weights,
                                job.on_cpu, job.out)
                else:  # nothing to compute: no parallel region to start
                    job.out.zero_()
                seconds = time.perf_counter() - start
                tokens = int(np.count_nonzero(on_cpu[job.ids.numpy()])) if experts else 0
                busy = time.perf_counter() - woke
                with self._lock:
                    counts = self._counts
                    counts.experts += experts
                    counts.tokens += tokens
                    counts.bytes += experts * self.store.layout.nbytes
                    counts.seconds += seconds
                    counts.jobs += 1
                    counts.busy_seconds += busy
                    if experts == 0:
                        counts.idle_jobs += 1
                        counts.idle_busy_seconds += busy
            except BaseException as exc:
                job.out.zero_()
                self._error = exc
            finally:
                self.signals.done(index)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()


def _leave_cores_to_the_launcher() -> None:
    """Run this thread's numba parallel kernels on all cores but `_SPARE_CORES` (numba's
    thread count is per calling thread; torch's is left alone)."""
    try:
        import numba
    except ImportError:
        return
    cores = int(numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]
    numba.set_num_threads(max(1, cores - _SPARE_CORES))
