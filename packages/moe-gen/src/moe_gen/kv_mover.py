"""Moving KV pages between the host arenas and the compute device in large batched copies.

Dimension key: N token slots, ... the per-token shape of a cached tensor.

A micro-batch's past keys are gathered on the host into one staging buffer (pinned on GPU
runs) and sent in one copy per cached tensor, never one copy per sequence or per page: small
copies run far below PCIe bandwidth (46.7 GB/s at 1 MB against 54 at 16 MB+ on the H200 box).

On CUDA the copies run on the mover's own stream, not the compute stream: the compute stream
waits for each copy (an event, no host sync), but a copy never waits for compute queued before
it. So while layer l's experts stream in and compute, the KV of layer l+1's micro-batches is
already crossing PCIe beside them; on one stream (the mover's first version) every KV copy
queued behind the previous layer's expert products and the link carried KV and experts in turn,
never together.

Device copies form a ring of `ring_size` slots. A slot is reused only once the attention that
read its gathered copy has been enqueued and has run (`release` records that on the compute
stream); that bounds the device memory held by copies not yet attended to `ring_size` gathers,
which the planner counts.

Gathering ahead. The host gather itself (an index_select of the arena rows into pinned staging)
is the biggest piece of the main thread's work in a step: on the H200 with DeepSeek-V2-Lite,
~7 ms per layer out of ~28, while the device waits for the host (2026-11-29 trace). A step knows
every gather it will make before it starts (the micro-batches' slots are fixed), so `plan` hands
them to a worker thread, which gathers them in order into a ring of `2 * ring_size` pinned
staging buffers (torch releases the GIL inside the gather) while the main thread issues the
previous layers' work; `gather` then only waits for the worker's result and issues the copy. A
staging buffer is reused once the copy out of it has landed. A `gather` that does not match the
plan (a different arena or slots) drops the rest of the plan and gathers on the calling thread.
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections import deque
from collections.abc import Sequence

import torch

__all__ = ["KVMover"]


class _Slot:
    """One device copy in flight or waiting to be attended."""

    __slots__ = ("landed", "read")

    def __init__(self) -> None:
        self.landed: torch.cuda.Event | None = None  # the copy to the device has finished
        self.read: torch.cuda.Event | None = None  # compute has read the gathered copy


class _Request:
    """One gather: its rows, the staging buffer it fills, and how that went."""

    __slots__ = ("arena", "done", "dropped", "error", "issued", "landed", "out", "previous",
                 "slot", "slots", "staged", "staging")

    def __init__(self, arena: torch.Tensor, slots: torch.Tensor, staging: int,
                 previous: _Request | None) -> None:
        self.arena = arena
        self.slots = slots
        self.staging = staging  # index of its staging buffer
        self.previous = previous  # the request that used that buffer before (its copy must land)
        self.staged: torch.Tensor | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()  # gathered (or failed)
        self.issued = threading.Event()  # its copy was issued (or it was dropped)
        self.landed: torch.cuda.Event | None = None  # its copy out of staging, once issued
        self.dropped = False  # no longer wanted: the worker skips it
        self.out: torch.Tensor | None = None  # the rows where compute reads them, once issued
        self.slot: _Slot | None = None  # its device ring slot, once issued


class KVMover:
    """Gathers arena slots to the device and writes new entries back (at `flush`).

    Attributes:
        device: The compute device.
        ring_size: Gathers that may be in flight or waiting to be attended.
        h2d_bytes: Bytes sent host-to-device so far.
        d2h_bytes: Bytes sent device-to-host so far.
    """

    def __init__(self, device: torch.device, ring_size: int = 4,
                 gather_ahead: bool | None = None) -> None:
        """`gather_ahead` (default: on CUDA) starts the worker thread that serves `plan`; on the
        CPU a planned gather is returned as a copy of its staging buffer (tests)."""
        if ring_size < 1:
            raise ValueError(f"ring_size must be at least 1, got {ring_size}")
        self.device = device
        self.ring_size = ring_size
        self.h2d_bytes = 0
        self.d2h_bytes = 0
        self._on_cuda = device.type == "cuda"
        self._stream = torch.cuda.Stream(device) if self._on_cuda else None
        self._slots = [_Slot() for _ in range(ring_size)]
        self._next = 0
        self._unreleased: list[_Slot] = []
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._buffers: list[torch.Tensor | None] = [None] * (2 * ring_size)  # pinned staging
        self._owner: list[_Request | None] = [None] * (2 * ring_size)
        self._next_buffer = 0
        self._planned: deque[_Request] = deque()
        self._queue: queue.SimpleQueue[_Request | None] | None = None
        if self._on_cuda if gather_ahead is None else gather_ahead:
            self._queue = queue.SimpleQueue()
            # The thread holds the queue and the buffers, not the mover: a mover nobody uses
            # any more is collected, and its finaliser stops the thread.
            threading.Thread(target=_work, args=(self._queue, self._buffers, self._on_cuda),
                             name="kv-gather", daemon=True).start()
            weakref.finalize(self, self._queue.put, None)

    def plan(self, gathers: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """The `(arena, slots)` gathers the coming calls will ask for, in order: the worker
        starts on them now (without a worker this does nothing)."""
        self._drop_plan()
        if self._queue is None:
            return
        for arena, slots in gathers:
            request = self._request(arena, slots)
            self._planned.append(request)
            self._queue.put(request)

    def issue_ahead(self, count: int) -> None:
        """Start the device copies of the next `count` planned gathers not started yet, before
        anyone asks for them (say, the next layer's KV before this layer's experts are
        streamed: the copies then queue ahead of the expert copies instead of behind them, and
        the next layer's attention need not wait for the whole expert stream). Waits for the
        worker's host gathers, and for the device ring like `gather` does."""
        for request in self._planned:
            if count <= 0:
                return
            if request.out is None:
                self._issue(request)
                count -= 1

    def gather(self, arena: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Rows `slots` `[N]` of `arena` `[slots, ...]` on the device: `[N, ...]`.

        On CUDA the result is ready for work queued on the current stream after this call; call
        `release` once that work is queued.
        """
        if not self._on_cuda and self._queue is None:
            return arena.index_select(0, slots)
        planned = self._planned[0] if self._planned else None
        if planned is not None and planned.arena is arena and planned.slots is slots:
            request = self._planned.popleft()
        else:
            self._drop_plan()
            request = self._request(arena, slots)
            _fill(request, self._buffers, self._on_cuda)
        if request.out is None:
            self._issue(request)
        out, slot = request.out, request.slot
        assert out is not None
        if not self._on_cuda:
            return out
        assert slot is not None and request.landed is not None
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(request.landed)
        out.record_stream(compute)  # freed after the compute stream's reads, not the copy's
        self._unreleased.append(slot)
        return out

    def _issue(self, request: _Request) -> None:
        """Copy a gathered request to the device on the mover's stream (the CPU: a copy)."""
        request.done.wait()
        if request.error is not None:
            request.issued.set()
            raise request.error
        staged = request.staged
        assert staged is not None
        if not self._on_cuda:
            request.out = staged.clone()
            request.issued.set()
            return
        assert self._stream is not None
        slot = self._slots[self._next]
        self._next = (self._next + 1) % self.ring_size
        # Wait until its last copy was attended (bounds device memory), or at least landed.
        last = slot.read or slot.landed
        if last is not None:
            last.synchronize()
        with torch.cuda.stream(self._stream):
            request.out = staged.to(self.device, non_blocking=True)
        landed = torch.cuda.Event()
        landed.record(self._stream)
        slot.landed, slot.read = landed, None
        request.slot = slot
        request.landed = landed
        request.issued.set()
        self.h2d_bytes += staged.numel() * staged.element_size()

    def release(self) -> None:
        """Declare that every kernel reading the gathers since the last `release` is queued on
        the current stream: their staging slots come free once those kernels have run."""
        if not self._unreleased:
            return
        read = torch.cuda.Event()
        read.record(torch.cuda.current_stream(self.device))
        for slot in self._unreleased:
            slot.read = read
        self._unreleased = []

    def scatter(self, arena: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> None:
        """Queue `values` `[N, ...]` (on the device) for rows `slots` `[N]` of `arena`.

        The write happens at `flush`: new entries are read only by later steps, and deferring
        them keeps the device queue free of syncs inside the step (a sync per micro-batch would
        serialise each gather with the previous micro-batch's copy and attention).
        """
        self._pending.append((arena, slots, values))

    def flush(self) -> None:
        """Write every queued entry into its arena (one device-to-host copy per arena)."""
        for arena, slots, values in self._take_pending():
            host = values.to("cpu", arena.dtype)
            if self._on_cuda:
                self.d2h_bytes += host.numel() * host.element_size()
            arena.index_copy_(0, slots, host)

    def _take_pending(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The queued entries, emptied: per arena, `(arena, slots [n], values [n, ...])` with
        every write to it joined, in the order they were queued."""
        by_arena: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        for item in self._pending:
            by_arena.setdefault(id(item[0]), []).append(item)
        self._pending = []
        return [(items[0][0], torch.cat([i[1] for i in items]), torch.cat([i[2] for i in items]))
                for items in by_arena.values()]

    def close(self) -> None:
        """Stop the worker thread (the mover still gathers, on the calling thread)."""
        self._drop_plan()
        if self._queue is not None:
            self._queue.put(None)
            self._queue = None

    # Internals ------------------------------------------------------------------------------

    def _request(self, arena: torch.Tensor, slots: torch.Tensor) -> _Request:
        """A request for the next staging buffer, remembering who used that buffer before."""
        index = self._next_buffer
        self._next_buffer = (index + 1) % len(self._buffers)
        request = _Request(arena, slots, index, self._owner[index])
        self._owner[index] = request
        return request

    def _drop_plan(self) -> None:
        """Forget the planned gathers not asked for (the worker skips them; nothing will copy
        out of their buffers) and wait until the worker is past them, so that no buffer is
        written by two threads."""
        dropped = list(self._planned)
        self._planned.clear()
        for request in dropped:
            request.dropped = True
            request.issued.set()
        for request in dropped:
            request.done.wait()


def _fill(request: _Request, buffers: list[torch.Tensor | None], pin: bool) -> None:
    """Gather `request` into its staging buffer (`buffers[request.staging]`, grown as needed)
    once the previous copy out of it has landed."""
    try:
        if request.dropped:
            return
        previous = request.previous
        if previous is not None:
            previous.issued.wait()
            if previous.landed is not None:
                previous.landed.synchronize()
            request.previous = None  # keep no chain of requests alive
        arena, slots = request.arena, request.slots
        numel = slots.numel() * arena[0].numel()
        buffer = buffers[request.staging]
        if buffer is None or buffer.numel() < numel or buffer.dtype != arena.dtype:
            size = 1 << max(numel - 1, 1).bit_length()  # round up: few re-pins
            buffer = torch.empty(size, dtype=arena.dtype, pin_memory=pin)
            buffers[request.staging] = buffer
        staged = buffer[:numel].view(slots.numel(), *arena.shape[1:])
        torch.index_select(arena, 0, slots, out=staged)
        request.staged = staged
    except BaseException as exc:  # handed to the caller of `gather`
        request.error = exc
    finally:
        request.done.set()


def _work(requests: queue.SimpleQueue[_Request | None], buffers: list[torch.Tensor | None],
          pin: bool) -> None:
    """The worker thread: fill requests in order until told to stop."""
    while (request := requests.get()) is not None:
        _fill(request, buffers, pin)
