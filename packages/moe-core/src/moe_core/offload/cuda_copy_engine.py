"""The CUDA copy engine: host-to-device expert copies on two CuPy streams, ordered by events.

This is the only module that touches CuPy, and it imports it only when an engine is built (no CUDA
work at import time).

Why a host-side prefetch queue: CUDA stream priorities steer the scheduling of *kernels*, not of
copies (CUDA runtime docs, `cudaStreamCreateWithPriority`), so a demand copy on a high-priority
stream would still queue behind megabytes of prefetches already handed to the DMA engine. The
engine therefore keeps prefetches in a FIFO on the host and hands only a small window of them
(`prefetch_window`, default 2, enough to keep the link busy between top-ups) to the prefetch
stream. A demand copy then waits at most for the window, a queued prefetch can still be cancelled,
and a prefetch someone waits for while it is still queued is promoted to the demand stream. The
window is topped up on every `submit`, `wait`, `cancel` and `poll`, by querying events (never by
blocking).

`wait` makes torch's *current* stream wait on the copy's event (`cudaStreamWaitEvent`): the host
never synchronises on the hot path. `drain` is the only call that blocks.
"""

from __future__ import annotations

from collections import deque
from types import ModuleType
from typing import Any

import torch

from moe_core.offload.copy_engine import CopyLane, CopyTicket

__all__ = ["CudaCopyEngine"]

# Out-of-range priorities are clamped by CUDA to the device's range (lower = more urgent), so
# these two give the greatest and the least priority without querying the range.
_DEMAND_PRIORITY = -1000
_PREFETCH_PRIORITY = 1000


class _Copy:
    """Device-side record of an enqueued copy: its events (start for timing, end for waits)."""

    __slots__ = ("end", "start")

    def __init__(self, start: Any, end: Any) -> None:  # cupy.cuda.Event (start may be None)
        self.start = start
        self.end = end


class CudaCopyEngine:
    """`CopyEngine` on CUDA: a high-priority demand stream, a prefetch stream, CuPy events.

    Attributes:
        device: The CUDA device the copies go to.
        prefetch_window: Most prefetch copies handed to the prefetch stream at once.
        bytes_copied: Bytes of every copy enqueued on a stream (cancelled copies never count).
        promotions: Queued prefetches promoted to the demand lane because someone waited for them.
    """

    def __init__(self, device: str | torch.device = "cuda", prefetch_window: int = 2,
                 time_copies: bool = True) -> None:
        """Create the two streams on `device`.

        Args:
            device: A CUDA device.
            prefetch_window: Prefetches enqueued on the stream at once (at least 1).
            time_copies: Record a start event per copy so `copy_seconds` can be measured.

        Raises:
            RuntimeError: CuPy is not installed, or `device` is not a CUDA device.
        """
        try:
            import cupy
        except ImportError as exc:
            raise RuntimeError("CudaCopyEngine needs CuPy: install moe-core with the extra that "
                               "matches your CUDA, `moe-core[cuda12]` or `moe-core[cuda13]`") \
                from exc
        if prefetch_window < 1:
            raise ValueError(f"prefetch_window must be at least 1, got {prefetch_window}")
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise RuntimeError(f"CudaCopyEngine needs a CUDA device, got {self.device}")
        self._index = (self.device.index if self.device.index is not None
                       else torch.cuda.current_device())
        self.device = torch.device("cuda", self._index)
        self._cupy: ModuleType = cupy
        self._rt = cupy.cuda.runtime
        self.prefetch_window = prefetch_window
        self.time_copies = time_copies
        with cupy.cuda.Device(self._index):
            self._stream_ptr = {
                CopyLane.DEMAND: self._rt.streamCreateWithPriority(self._rt.streamNonBlocking,
                                                                   _DEMAND_PRIORITY),
                CopyLane.PREFETCH: self._rt.streamCreateWithPriority(self._rt.streamNonBlocking,
                                                                     _PREFETCH_PRIORITY),
            }
        self._queued: deque[CopyTicket] = deque()  # prefetches not yet on a stream
        self._in_flight: dict[CopyLane, deque[CopyTicket]] = {lane: deque() for lane in CopyLane}
        self._fences: dict[int, Any] = {}  # dst row address (`_rows`) -> event a copy waits on
        self.bytes_copied = 0
        self.promotions = 0
        self._copy_seconds = 0.0

    # The CopyEngine protocol ----------------------------------------------------------------

    def submit(self, src: torch.Tensor, dst: torch.Tensor, lane: CopyLane,
               key: object = None) -> CopyTicket:
        """Queue a copy of host `src` into device `dst` (contiguous, same size and dtype).

        A demand copy goes onto the demand stream at once; a prefetch joins the host FIFO and
        reaches the prefetch stream when the window has room. `src` should be pinned (a pageable
        source is correct but crosses PCIe at a tenth of the speed and blocks the host).
        """
        self._check(src, dst)
        ticket = CopyTicket(src, dst, lane, key)
        if lane is CopyLane.DEMAND:
            self._enqueue(ticket, CopyLane.DEMAND)
        else:
            self._queued.append(ticket)
        self.poll()
        return ticket

    def cancel(self, ticket: CopyTicket) -> bool:
        """Cancel a prefetch still in the host FIFO; False once it is on a stream."""
        if ticket.cancelled or ticket.handle is not None or ticket not in self._queued:
            return False
        self._queued.remove(ticket)
        ticket.cancelled = True
        self.poll()
        return True

    def wait(self, ticket: CopyTicket) -> None:
        """Make torch's current stream on the device wait for `ticket`'s copy (no host sync).

        A prefetch still in the host FIFO is promoted to the demand stream first.

        Raises:
            ValueError: the ticket was cancelled.
        """
        if ticket.cancelled:
            raise ValueError(f"copy {ticket.key!r} was cancelled")
        if ticket.handle is None:
            self._queued.remove(ticket)
            ticket.lane = CopyLane.DEMAND
            self.promotions += 1
            self._enqueue(ticket, CopyLane.DEMAND)
        record = ticket.handle
        assert isinstance(record, _Copy)
        consumer = torch.cuda.current_stream(self.device).cuda_stream
        self._rt.streamWaitEvent(consumer, record.end.ptr, 0)
        self.poll()

    def drain(self) -> None:
        """Enqueue every queued prefetch and block until both streams are idle."""
        while self._queued:
            self._enqueue(self._queued.popleft(), CopyLane.PREFETCH)
        for ptr in self._stream_ptr.values():
            self._rt.streamSynchronize(ptr)
        self._reap()

    # Beyond the protocol --------------------------------------------------------------------

    @property
    def copy_seconds(self) -> float:
        """Summed device time of the copies that have completed, from event pairs (measured
        lazily: a copy counts once its end event is observed). Copies that ran at the same time
        on the two streams are each counted in full. 0.0 when `time_copies` is off."""
        self._reap()
        return self._copy_seconds

    def poll(self) -> None:
        """Note finished copies and top up the prefetch window (never blocks)."""
        self._reap()
        while self._queued and len(self._in_flight[CopyLane.PREFETCH]) < self.prefetch_window:
            self._enqueue(self._queued.popleft(), CopyLane.PREFETCH)

    def is_complete(self, ticket: CopyTicket) -> bool:
        """Whether `ticket`'s copy has landed (queries its event)."""
        record = ticket.handle
        return isinstance(record, _Copy) and bool(record.end.done)

    def release(self, *tickets: CopyTicket) -> None:
        """Declare that every kernel reading the tickets' destinations has been enqueued on
        torch's current stream: the next copy into any of them (a slot reused for another
        expert) waits for those reads on the device instead of overwriting the slot under them.
        One event covers every ticket of the call, and every row of a `[C, N]` destination
        (`_rows`)."""
        if not tickets:
            return
        with self._cupy.cuda.Device(self._index):
            event = self._cupy.cuda.Event(disable_timing=True)
        consumer = torch.cuda.current_stream(self.device).cuda_stream
        self._rt.eventRecord(event.ptr, consumer)
        for ticket in tickets:
            self._fences.update(dict.fromkeys(_rows(ticket), event))

    def fence_current_stream(self) -> None:
        """Make every copy enqueued from now on (both lanes) start only after the work already
        enqueued on torch's current stream, e.g. kernels still reading slots about to be
        overwritten, or a slot pool just initialised there."""
        with self._cupy.cuda.Device(self._index):
            event = self._cupy.cuda.Event(disable_timing=True)
            self._rt.eventRecord(event.ptr, torch.cuda.current_stream(self.device).cuda_stream)
            for ptr in self._stream_ptr.values():
                self._rt.streamWaitEvent(ptr, event.ptr, 0)

    @property
    def queued(self) -> int:
        """Prefetches waiting in the host FIFO."""
        return len(self._queued)

    def close(self) -> None:
        """Drain, then destroy the two streams (the engine is unusable afterwards)."""
        self.drain()
        for ptr in self._stream_ptr.values():
            self._rt.streamDestroy(ptr)
        self._stream_ptr = {}

    # Internals ------------------------------------------------------------------------------

    def _check(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        if src.numel() != dst.numel() or src.dtype != dst.dtype:
            raise ValueError(f"copy of {src.numel()} {src.dtype} into {dst.numel()} {dst.dtype}")
        if src.device.type != "cpu" or dst.device != self.device:
            raise ValueError(f"copy from {src.device} to {dst.device}: this engine copies from "
                             f"host memory to {self.device}")
        if not (src.is_contiguous() and dst.is_contiguous()):
            raise ValueError("copy source and destination must be contiguous")

    def _enqueue(self, ticket: CopyTicket, lane: CopyLane) -> None:
        """Put `ticket`'s copy on `lane`'s stream, bracketed by events."""
        stream = self._stream_ptr[lane]
        cuda = self._cupy.cuda
        popped = (self._fences.pop(row, None) for row in _rows(ticket))
        fences = {id(event): event for event in popped if event is not None}  # distinct events
        with cuda.Device(self._index):
            for fence in fences.values():
                self._rt.streamWaitEvent(stream, fence.ptr, 0)
            start = self._start_event(lane, fenced=bool(fences))
            end = cuda.Event(disable_timing=not self.time_copies)
            self._rt.memcpyAsync(ticket.dst_ptr, ticket.src.data_ptr(), ticket.nbytes,
                                 self._rt.memcpyHostToDevice, stream)
            self._rt.eventRecord(end.ptr, stream)
        ticket.handle = _Copy(start, end)
        self._in_flight[lane].append(ticket)
        self.bytes_copied += ticket.nbytes

    def _start_event(self, lane: CopyLane, fenced: bool) -> Any:
        """The event that marks where this copy starts on `lane`'s stream, for timing.

        Copies queued back to back start when the previous one ends, so its end event serves;
        a new start event is recorded only when the stream is idle or the copy waits on a
        fence. Each event record is a command the DMA engine executes between copies, and at
        1 MB copies a start event per copy cost ~10% of the bandwidth (H200).
        """
        if not self.time_copies:
            return None
        flights = self._in_flight[lane]
        if flights and not fenced:
            previous = flights[-1].handle
            assert isinstance(previous, _Copy)
            if not previous.end.done:
                return previous.end
        start = self._cupy.cuda.Event()
        self._rt.eventRecord(start.ptr, self._stream_ptr[lane])
        return start

    def _reap(self) -> None:
        """Mark landed copies done, oldest first per stream (a stream completes in order)."""
        for flights in self._in_flight.values():
            while flights:
                record = flights[0].handle
                assert isinstance(record, _Copy)
                if not record.end.done:
                    break
                if record.start is not None:
                    ms = self._cupy.cuda.get_elapsed_time(record.start, record.end)
                    self._copy_seconds += ms / 1000.0
                flights.popleft().done = True


def _rows(ticket: CopyTicket) -> list[int]:
    """The device addresses fences are kept under for `ticket`'s destination: one per row of a
    `[C, N]` destination (C slots written by one copy of C experts), the start of any other.

    Per row, because later copies need not cover the same rows: a copy into some of the slots
    of an earlier multi-slot copy must wait for exactly their readers.
    """
    dst = ticket.dst
    if dst.dim() < 2 or dst.shape[0] < 2:
        return [ticket.dst_ptr]
    row_bytes = dst.stride(0) * dst.element_size()
    return [ticket.dst_ptr + i * row_bytes for i in range(dst.shape[0])]
