"""The copy engine interface: host-to-device expert copies on two lanes, and its CPU
implementation (used in CI and on machines without CUDA).

Lanes: `DEMAND` copies (an expert needed now) always go ahead of queued `PREFETCH` copies; a
prefetch that has not started can be cancelled when it becomes stale. The consumer never
synchronises the device: it asks the engine to make its compute wait for exactly the copy it
needs (`wait`). The CUDA implementation lives in `cuda_copy_engine.py` (the only module that
touches CuPy).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol, runtime_checkable

import torch

__all__ = ["CopyEngine", "CopyLane", "CopyTicket", "CpuCopyEngine"]


class CopyLane(Enum):
    """Priority lane of a copy."""

    DEMAND = 0
    PREFETCH = 1


@dataclass(eq=False)
class CopyTicket:
    """One submitted copy.

    Attributes:
        src: Source block (host).
        dst: Destination (a slot view).
        lane: Its lane.
        key: What the caller calls it (an `ExpertId`, say), for logs and cancellation.
        done: The copy has been carried out (CPU engine) or its completion recorded (CUDA).
        cancelled: It was cancelled before it started.
    """

    src: torch.Tensor
    dst: torch.Tensor
    lane: CopyLane
    key: object = None
    done: bool = False
    cancelled: bool = False
    handle: object = field(default=None, repr=False)  # implementation data (a CUDA event)
    dst_ptr: int = field(init=False, repr=False)  # `dst.data_ptr()`, read once

    def __post_init__(self) -> None:
        self.dst_ptr = self.dst.data_ptr()

    @property
    def nbytes(self) -> int:
        """Bytes this copy moves."""
        return self.src.numel() * self.src.element_size()


@runtime_checkable
class CopyEngine(Protocol):
    """Asynchronous host-to-device copies with a demand lane ahead of a prefetch lane."""

    bytes_copied: int

    @property
    def copy_seconds(self) -> float:
        """Seconds copies have taken so far (as measured by the engine)."""
        ...

    def submit(self, src: torch.Tensor, dst: torch.Tensor, lane: CopyLane,
               key: object = None) -> CopyTicket:
        """Queue a copy of `src` into `dst` (same number of elements and dtype)."""
        ...

    def cancel(self, ticket: CopyTicket) -> bool:
        """Cancel a queued copy that has not started; True if it was cancelled."""
        ...

    def wait(self, ticket: CopyTicket) -> None:
        """Make the consumer's compute wait until `ticket`'s copy has landed."""
        ...

    def drain(self) -> None:
        """Complete every queued copy (end of a run; never on the hot path)."""
        ...

    def release(self, *tickets: CopyTicket) -> None:
        """Declare that every read of each ticket's `dst` has been issued: the next copy into
        the same destination (a slot reused for another expert) must not start before those
        reads end. A no-op where compute and copies are ordered anyway (the CPU engine)."""
        ...

    def fence_current_stream(self) -> None:
        """Make every copy enqueued from now on start only after the compute already issued
        (e.g. reads of a slot about to be overwritten that no ticket tracked). A no-op on the
        CPU engine."""
        ...


class CpuCopyEngine:
    """Copies carried out on the calling thread, in lane order, when someone waits.

    Queued copies run demand-first (FIFO within a lane) until the awaited ticket is done, which
    is the ordering the CUDA engine guarantees; `log` records the order for tests.
    """

    def __init__(self) -> None:
        self._queues: dict[CopyLane, deque[CopyTicket]] = {lane: deque() for lane in CopyLane}
        self.log: list[object] = []
        self.bytes_copied = 0
        self.copy_seconds = 0.0

    def submit(self, src: torch.Tensor, dst: torch.Tensor, lane: CopyLane,
               key: object = None) -> CopyTicket:
        if src.numel() != dst.numel() or src.dtype != dst.dtype:
            raise ValueError(f"copy of {src.numel()} {src.dtype} into {dst.numel()} {dst.dtype}")
        ticket = CopyTicket(src, dst, lane, key)
        self._queues[lane].append(ticket)
        return ticket

    def cancel(self, ticket: CopyTicket) -> bool:
        queue = self._queues[ticket.lane]
        if ticket.done or ticket not in queue:
            return False
        queue.remove(ticket)
        ticket.cancelled = True
        return True

    def wait(self, ticket: CopyTicket) -> None:
        if ticket.cancelled:
            raise ValueError(f"copy {ticket.key!r} was cancelled")
        while not ticket.done:
            self._run_next()

    def drain(self) -> None:
        while any(self._queues.values()):
            self._run_next()

    def release(self, *tickets: CopyTicket) -> None:
        """Nothing to do: on the CPU, a copy runs only after the compute issued before it."""

    def fence_current_stream(self) -> None:
        """Nothing to do, as for `release`."""

    def _run_next(self) -> None:
        lane = CopyLane.DEMAND if self._queues[CopyLane.DEMAND] else CopyLane.PREFETCH
        ticket = self._queues[lane].popleft()
        start = time.perf_counter()
        ticket.dst.copy_(ticket.src.view_as(ticket.dst))
        self.copy_seconds += time.perf_counter() - start
        self.bytes_copied += ticket.nbytes
        ticket.done = True
        self.log.append(ticket.key)
