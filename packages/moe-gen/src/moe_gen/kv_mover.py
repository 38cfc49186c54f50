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

Staging buffers form a ring of `ring_size` slots. A slot is reused only once the attention that
read its gathered copy has been enqueued and has run (`release` records that on the compute
stream); that bounds the device memory held by copies not yet attended to `ring_size` gathers,
which the planner counts, and keeps the host from overwriting bytes still in flight.
"""

from __future__ import annotations

import torch

__all__ = ["KVMover"]


class _Slot:
    """One staging buffer and the events of the gather that used it last."""

    __slots__ = ("buffer", "landed", "read")

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None
        self.landed: torch.cuda.Event | None = None  # the copy out of the buffer has finished
        self.read: torch.cuda.Event | None = None  # compute has read the gathered copy


class KVMover:
    """Gathers arena slots to the device and writes new entries back (at `flush`).

    Attributes:
        device: The compute device.
        ring_size: Gathers that may be in flight or waiting to be attended.
        h2d_bytes: Bytes sent host-to-device so far.
        d2h_bytes: Bytes sent device-to-host so far.
    """

    def __init__(self, device: torch.device, ring_size: int = 4) -> None:
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

    def gather(self, arena: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Rows `slots` `[N]` of `arena` `[slots, ...]` on the device: `[N, ...]`.

        On CUDA the result is ready for work queued on the current stream after this call; call
        `release` once that work is queued.
        """
        if not self._on_cuda:
            return arena.index_select(0, slots)
        assert self._stream is not None
        numel = slots.numel() * arena[0].numel()
        slot = self._slots[self._next]
        self._next = (self._next + 1) % self.ring_size
        # Wait until its last copy was attended (bounds device memory), or at least landed
        # (a slot reused before its gather's `release`: the staging bytes are still needed).
        last = slot.read or slot.landed
        if last is not None:
            last.synchronize()
        if slot.buffer is None or slot.buffer.numel() < numel or slot.buffer.dtype != arena.dtype:
            size = 1 << max(numel - 1, 1).bit_length()  # round up: few re-pins
            slot.buffer = torch.empty(size, dtype=arena.dtype, pin_memory=True)
        staged = slot.buffer[:numel].view(slots.numel(), *arena.shape[1:])
        torch.index_select(arena, 0, slots, out=staged)
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._stream):
            out = staged.to(self.device, non_blocking=True)
        landed = torch.cuda.Event()
        landed.record(self._stream)
        compute.wait_event(landed)
        out.record_stream(compute)  # freed after the compute stream's reads, not the copy's
        slot.landed, slot.read = landed, None
        self._unreleased.append(slot)
        self.h2d_bytes += numel * arena.element_size()
        return out

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
        by_arena: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        for item in self._pending:
            by_arena.setdefault(id(item[0]), []).append(item)
        self._pending = []
        for items in by_arena.values():
            arena = items[0][0]
            slots = torch.cat([i[1] for i in items])
            host = torch.cat([i[2] for i in items]).to("cpu", arena.dtype)
            if self._on_cuda:
                self.d2h_bytes += host.numel() * host.element_size()
            arena.index_copy_(0, slots, host)
