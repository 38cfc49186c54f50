"""The KV mover whose gathers the GPU makes itself, reading the host pages in place.

Dimension key: N token slots, ... the per-token shape of a cached tensor.

`KVMover` gathers a micro-batch's past keys on the host (a worker thread's index_select into
pinned staging) and sends them in one copy. At moe-gen's batch 512 that is every cached byte of
every layer, every step (15 GB for Qwen3-30B-A3B x 24 at context 608): the host reads and writes
each byte before the copy engine reads it again, on one thread, and on the H200's host that
thread set the step, with the link idle 0.39 s of a 0.66 s step (docs/benchmarks.md, seventh
session). Here a kernel (`moe_core.MappedRowGather`) reads the rows straight from the pinned
arenas: each byte crosses host memory once, there is no staging and no worker, and the host
only launches.

Each gather lands in a device ring of `ring_size` buffers (the same count of gathers in flight
or waiting to be attended as `KVMover`, which the planner counts). A buffer is rewritten only
after the attention that read its previous gather has run: the gather waits for that on the
device (the event `release` records), never on the host. A buffer whose previous gather was not
released yet (say, a gather that was issued ahead and then dropped) is not reused: a fresh one
takes its place, and the old one lives as long as its readers. Buffers grow with the context
(an eighth of headroom, so a growing context re-allocates rarely).

The gathered rows' slot indices move to the device once per step (`plan`), in one copy through
a pinned buffer the mover keeps, on the mover's stream, which every gather then runs on.

New entries go back the same way (`flush`): the device writes each arena's new rows into their
host slots itself, on the mover's stream after the step's work, over the link's idle direction;
no copy to a host buffer, no index_copy on the host, and the host does not wait for the device
there (the step's own closing synchronisation covers it, before anything on the host reads the
pages; the next step's gathers run on the same stream, after it).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import torch
from moe_core import MappedRowGather

from moe_gen.kv_mover import KVMover

__all__ = ["MappedKVMover"]


class _RingBuffer:
    """One device buffer of the ring and the state of its last gather."""

    __slots__ = ("buffer", "landed", "owner", "read", "released")

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None
        self.owner: _Gather | None = None  # the gather it holds now
        self.landed: torch.cuda.Event | None = None  # the gather has finished (CUDA)
        self.read: torch.cuda.Event | None = None  # its readers have run (CUDA)
        self.released = True  # its readers are enqueued (nothing else will read it)


class _Gather:
    """One gather: rows `slots` of `arena`, and where it landed once issued."""

    __slots__ = ("arena", "out", "ring", "slots")

    def __init__(self, arena: torch.Tensor, slots: torch.Tensor) -> None:
        self.arena = arena
        self.slots = slots  # [N] int64 on the host
        self.out: torch.Tensor | None = None
        self.ring: _RingBuffer | None = None


class _IndexStaging:
    """Host int64 index tensors moved to the device in one copy, through a pinned buffer kept
    from call to call (on the H200 host, `Tensor.pin_memory()` per index tensor stalled 3-6 ms
    whenever the caching host allocator had no free block: 9 times in two steps of 1,024
    sequences, with the link idle; docs/benchmarks.md, ninth session)."""

    def __init__(self, device: torch.device, stream: torch.cuda.Stream) -> None:
        self._device = device
        self._stream = stream
        self._host: torch.Tensor | None = None
        self._copied: torch.cuda.Event | None = None  # the last copy has read `_host`

    def move(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """`tensors` (host, any integer dtype) as int64 device views of one buffer, copied on
        the stream without waiting; work on that stream may read them at once."""
        sizes = [t.numel() for t in tensors]
        total = sum(sizes)
        if self._copied is not None:
            self._copied.synchronize()  # the previous call's copy has read the buffer
        if self._host is None or self._host.numel() < total:
            self._host = torch.empty(total + total // 8, dtype=torch.long, pin_memory=True)
        host = self._host[:total]
        torch.cat([t.reshape(-1).to(torch.long) for t in tensors], out=host)
        with torch.cuda.stream(self._stream):
            moved = host.to(self._device, non_blocking=True)
            self._copied = torch.cuda.Event()
            self._copied.record(self._stream)
        return list(moved.split(sizes))


class MappedKVMover(KVMover):
    """`KVMover` whose gathers read the host arenas from the device (see the module docstring).

    The arenas must be readable by the device (`moe_core.mapped_rows_unsupported`); on the CPU
    the gather is an index_select (tests).
    """

    def __init__(self, device: torch.device, ring_size: int = 4,
                 gather: MappedRowGather | None = None) -> None:
        super().__init__(device, ring_size, gather_ahead=False)
        self._gather_rows = gather or MappedRowGather(device)
        self._ring = [_RingBuffer() for _ in range(ring_size)]
        self._next_ring = 0
        self._taken: list[_Gather] = []
        self._plan: deque[_Gather] = deque()
        self._on_device: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (host, dev)
        self._plan_indices: _IndexStaging | None = None
        self._flush_indices: _IndexStaging | None = None
        if self._on_cuda:
            assert self._stream is not None
            self._plan_indices = _IndexStaging(device, self._stream)
            self._flush_indices = _IndexStaging(device, self._stream)

    def plan(self, gathers: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """The `(arena, slots)` gathers the coming calls will ask for, in order: their slot
        indices move to the device now, once per distinct index tensor, in one copy."""
        self._plan = deque(_Gather(arena, slots) for arena, slots in gathers)
        self._on_device = {}
        distinct = list({id(slots): slots for _, slots in gathers}.values())
        if self._plan_indices is None or not distinct:
            for slots in distinct:
                self._device_slots(slots)
            return
        for slots, moved in zip(distinct, self._plan_indices.move(distinct), strict=True):
            self._on_device[id(slots)] = (slots, moved)

    def issue_ahead(self, count: int) -> None:
        """Launch the next `count` planned gathers not launched yet."""
        for request in self._plan:
            if count <= 0:
                return
            if request.out is None:
                self._launch(request)
                count -= 1

    def gather(self, arena: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Rows `slots` `[N]` of `arena` on the device: `[N, ...]`, ready for work queued on the
        current stream after this call; call `release` once that work is queued."""
        planned = self._plan[0] if self._plan else None
        if planned is not None and planned.arena is arena and planned.slots is slots:
            request = self._plan.popleft()
        else:
            self._plan.clear()  # issued ones keep their buffers until released below
            request = _Gather(arena, slots)
        if request.out is None:
            self._launch(request)
        ring, out = request.ring, request.out
        assert ring is not None and out is not None
        if self._on_cuda:
            assert ring.landed is not None
            torch.cuda.current_stream(self.device).wait_event(ring.landed)
        self._taken.append(request)
        return out

    def release(self) -> None:
        """Every kernel reading the gathers since the last `release` is queued on the current
        stream: their buffers may be rewritten once those kernels have run."""
        if not self._taken:
            return
        read = None
        if self._on_cuda:
            read = torch.cuda.Event()
            read.record(torch.cuda.current_stream(self.device))
        for request in self._taken:
            ring = request.ring
            if ring is not None and ring.owner is request:  # not re-taken by a later gather
                ring.read, ring.released = read, True
        self._taken = []

    def flush(self) -> None:
        """Write every queued entry into its arena: one device scatter per arena, ordered after
        the work queued so far on the current stream (on CUDA, without waiting for it)."""
        pending = self._take_pending()
        if not pending:
            return
        if self._flush_indices is None:
            for arena, slots, values in pending:
                self._gather_rows.scatter(arena, slots, values.to(arena.device, arena.dtype))
            return
        assert self._stream is not None
        rows = [values.to(arena.dtype).contiguous() for arena, _, values in pending]
        self._stream.wait_stream(torch.cuda.current_stream(self.device))  # rows are written
        indices = self._flush_indices.move([slots for _, slots, _ in pending])
        for (arena, _, _), index, new in zip(pending, indices, rows, strict=True):
            self.d2h_bytes += new.numel() * new.element_size()
            with torch.cuda.stream(self._stream):
                self._gather_rows.scatter(arena, index, new)
            new.record_stream(self._stream)

    def close(self) -> None:
        """Forget the plan (there is no worker to stop)."""
        self._plan.clear()

    # Internals ------------------------------------------------------------------------------

    def _device_slots(self, slots: torch.Tensor) -> torch.Tensor:
        """`slots` on the device (moved once per plan; on the mover's stream on CUDA)."""
        known = self._on_device.get(id(slots))
        if known is not None and known[0] is slots:
            return known[1]
        moved = self._move(slots)
        self._on_device[id(slots)] = (slots, moved)
        return moved

    def _move(self, slots: torch.Tensor) -> torch.Tensor:
        """Host int64 `slots` on the device (on CUDA: through pinned memory, on the mover's
        stream, without waiting); for a gather nobody planned."""
        if not self._on_cuda:
            return slots.to(self.device)
        assert self._stream is not None
        with torch.cuda.stream(self._stream):
            return slots.to(torch.long).pin_memory().to(self.device, non_blocking=True)

    def _launch(self, request: _Gather) -> None:
        """Launch `request`'s gather into the next ring buffer."""
        arena, slots = request.arena, request.slots
        ring = self._ring[self._next_ring]
        self._next_ring = (self._next_ring + 1) % self.ring_size
        numel = slots.numel() * arena[0].numel()
        buffer = ring.buffer
        fresh = (buffer is None or not ring.released or buffer.numel() < numel
                 or buffer.dtype != arena.dtype)
        if fresh:
            buffer = torch.empty(numel + numel // 8, dtype=arena.dtype, device=self.device)
            if self._on_cuda:
                assert self._stream is not None
                buffer.record_stream(self._stream)  # freed only once its gathers have run
            ring.buffer, ring.read = buffer, None
        assert buffer is not None
        out = buffer[:numel].view(slots.numel(), *arena.shape[1:])
        index = self._device_slots(slots)
        if self._on_cuda:
            assert self._stream is not None
            with torch.cuda.stream(self._stream):
                if ring.read is not None:  # its last readers must have run
                    self._stream.wait_event(ring.read)
                self._gather_rows(arena, index, out)
                landed = torch.cuda.Event()
                landed.record(self._stream)
            ring.landed = landed
        else:
            self._gather_rows(arena, index, out)
        ring.read, ring.released, ring.owner = None, False, request
        request.out, request.ring = out, ring
        self.h2d_bytes += numel * arena.element_size()
