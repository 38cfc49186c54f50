"""How a layer call is handed to the CPU lane's worker and back (`cpu_lane`): two ways, one
protocol, chosen by `lane_signals`.

Per call, in stream order: the executor stages the call's inputs into the job's pinned buffers,
then `start_on_stream(job)` (the worker may start once the copies have landed); the GPU computes
its share; `wait_on_stream(job)` (the stream waits until the worker has written the job's
output), then the output is copied back. The worker loops on `take` (the next job, or `STOP`)
and `done(job)`. On a CPU "device" the host does the stream's part (`start`, `wait`).

- `SemaphoreSignals` (`handover="host_functions"`): two POSIX semaphores posted and awaited by
  CUDA host functions, and a pinned mailbox for the job's index. Portable to any CUDA stream;
  measured at ~0.4 ms per round trip on the H200 machine (decision 0009), paid by every layer.
- `FlagSignals` (`handover="flags"`): two host flags (`host_flag`): the stream writes the job's
  number into one and waits for it in the other; the worker spins on the first. No host
  function, no callback thread, no futex wake-up; the worker's spinning holds one core while
  decode runs (it sleeps after `host_flag.IDLE_AFTER_S` idle).

Layer calls are strictly ordered on one stream, so one pair of signals serves every job, in
eager steps and in replays of captured ones.
"""

from __future__ import annotations

from typing import Literal, Protocol

import torch

from moe_core.offload.host_flag import HostFlag, host_flags_unsupported
from moe_core.offload.host_semaphore import HostSemaphore, host_semaphores_unsupported

__all__ = ["HANDOVERS", "STOP", "FlagSignals", "Handover", "LaneSignals", "SemaphoreSignals",
           "lane_signals", "lane_signals_unsupported"]

Handover = Literal["auto", "flags", "host_functions"]
HANDOVERS: tuple[str, ...] = ("auto", "flags", "host_functions")
STOP = -1
"""What `take` returns once `stop` was called."""


class LaneSignals(Protocol):
    """The hand-over of jobs (numbered from 0) between a stream (or the host) and the worker."""

    name: str

    def register(self, job: int) -> None:
        """Called once per job as it is made (before any capture that uses it)."""
        ...

    def start_on_stream(self, stream: int, job: int) -> None:
        """Enqueue on `stream`: the worker may take `job` once what precedes has landed."""
        ...

    def start(self, job: int) -> None:
        """From the host: the worker may take `job` now."""
        ...

    def stop(self) -> None:
        """From the host: the worker's next `take` returns `STOP`."""
        ...

    def take(self) -> int:
        """The worker: the next job (or `STOP`), waiting without the GIL."""
        ...

    def done(self, job: int) -> None:
        """The worker: `job`'s output is written."""
        ...

    def wait_on_stream(self, stream: int, job: int) -> None:
        """Enqueue on `stream`: wait until the worker is done with `job`."""
        ...

    def wait(self, job: int) -> None:
        """From the host: wait until the worker is done with `job`."""
        ...


class SemaphoreSignals:
    """Host functions posting and awaiting POSIX semaphores, and a pinned mailbox."""

    name = "host_functions"

    def __init__(self, device: torch.device) -> None:
        self._device = device
        self._mailbox = torch.full((1,), STOP, dtype=torch.long,
                                   pin_memory=device.type == "cuda")
        self._ids: dict[int, torch.Tensor] = {}
        self._ready = HostSemaphore()
        self._done = HostSemaphore()

    def register(self, job: int) -> None:
        # a fill, not a host copy: a job may first be needed inside a capture's warm-up
        self._ids[job] = torch.full((1,), job, dtype=torch.long, device=self._device)

    def start_on_stream(self, stream: int, job: int) -> None:
        self._mailbox.copy_(self._ids[job], non_blocking=True)
        self._ready.post_on_stream(stream)

    def start(self, job: int) -> None:
        self._mailbox[0] = job
        self._ready.post()

    def stop(self) -> None:
        self.start(STOP)

    def take(self) -> int:
        self._ready.wait()
        return int(self._mailbox[0])

    def done(self, job: int) -> None:
        self._done.post()

    def wait_on_stream(self, stream: int, job: int) -> None:
        self._done.wait_on_stream(stream)

    def wait(self, job: int) -> None:
        self._done.wait()


class FlagSignals:
    """Two host flags: `go` holds the started job's number + 1 (-1: stop) until the worker takes
    it; `finished` holds the done job's number + 1 until the stream (or host) takes it."""

    name = "flags"

    def __init__(self, device: torch.device) -> None:
        self._go = HostFlag(device)
        self._finished = HostFlag(device)

    def register(self, job: int) -> None:
        pass  # the job's number is a constant of the stream's operations

    def start_on_stream(self, stream: int, job: int) -> None:
        self._go.set_on_stream(stream, job + 1)

    def start(self, job: int) -> None:
        self._go.set(job + 1)

    def stop(self) -> None:
        self._go.set(-1)

    def take(self) -> int:
        value = self._go.take()
        return STOP if value < 0 else value - 1

    def done(self, job: int) -> None:
        self._finished.set(job + 1)

    def wait_on_stream(self, stream: int, job: int) -> None:
        self._finished.take_on_stream(stream, job + 1)

    def wait(self, job: int) -> None:
        value = self._finished.take()
        if value != job + 1:
            raise RuntimeError(f"the CPU lane finished job {value - 1}, expected {job}")


def lane_signals_unsupported(handover: str, device: torch.device) -> str | None:
    """Why `handover` cannot be used on `device`, or None (`"auto"`: why neither can)."""
    cuda = device.type == "cuda"
    if handover == "flags":
        return host_flags_unsupported(cuda)
    if handover == "host_functions":
        return host_semaphores_unsupported(cuda)
    if handover == "auto":
        flags, semaphores = host_flags_unsupported(cuda), host_semaphores_unsupported(cuda)
        return None if flags is None or semaphores is None else f"{flags}; {semaphores}"
    raise ValueError(f"handover must be one of {', '.join(HANDOVERS)}, got {handover!r}")


def lane_signals(handover: str, device: torch.device) -> LaneSignals:
    """The signals for `handover` on `device`. `"auto"`: flags on CUDA where the driver and numba
    allow them (they spare the host functions' round trip), else semaphores; on a CPU "device"
    semaphores (nothing to spare there, and no core spent spinning).

    Raises:
        ValueError: an unknown `handover`.
        RuntimeError: `handover` cannot be used here (the reason).
    """
    reason = lane_signals_unsupported(handover, device)
    if reason is not None:
        raise RuntimeError(f"the CPU lane's {handover} hand-over is unavailable: {reason}")
    if handover == "auto":
        cuda = device.type == "cuda"
        handover = "flags" if cuda and host_flags_unsupported(cuda) is None else "host_functions"
        if host_semaphores_unsupported(cuda) is not None:
            handover = "flags"
    return FlagSignals(device) if handover == "flags" else SemaphoreSignals(device)
