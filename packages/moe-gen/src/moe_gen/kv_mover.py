"""Moving KV pages between the host arenas and the compute device in large batched copies.

Dimension key: N token slots, ... the per-token shape of a cached tensor.

A micro-batch's past keys are gathered on the host into one staging buffer (pinned on GPU
runs) and sent in one copy per cached tensor, never one copy per sequence or per page: small
copies run far below PCIe bandwidth (46.7 GB/s at 1 MB against 54 at 16 MB+ on the H200 box).
Staging buffers form a small ring; a buffer is reused only once the copy out of it has finished
(a CUDA event), so the host never overwrites bytes still in flight.
"""

from __future__ import annotations

import torch

__all__ = ["KVMover"]

_RING = 4


class KVMover:
    """Gathers arena slots to the device and writes new entries back (at `flush`).

    Attributes:
        device: The compute device.
        h2d_bytes: Bytes sent host-to-device so far.
        d2h_bytes: Bytes sent device-to-host so far.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.h2d_bytes = 0
        self.d2h_bytes = 0
        self._on_cuda = device.type == "cuda"
        self._staging: list[torch.Tensor | None] = [None] * _RING
        self._events: list[torch.cuda.Event | None] = [None] * _RING
        self._next = 0
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def gather(self, arena: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Rows `slots` `[N]` of `arena` `[slots, ...]` on the device: `[N, ...]`."""
        if not self._on_cuda:
            return arena.index_select(0, slots)
        numel = slots.numel() * arena[0].numel()
        i = self._next
        self._next = (i + 1) % _RING
        event = self._events[i]
        if event is not None:
            event.synchronize()
        buffer = self._staging[i]
        if buffer is None or buffer.numel() < numel or buffer.dtype != arena.dtype:
            size = 1 << max(numel - 1, 1).bit_length()  # round up: few re-pins
            buffer = torch.empty(size, dtype=arena.dtype, pin_memory=True)
            self._staging[i] = buffer
        staged = buffer[:numel].view(slots.numel(), *arena.shape[1:])
        torch.index_select(arena, 0, slots, out=staged)
        out = staged.to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._events[i] = event
        self.h2d_bytes += numel * arena.element_size()
        return out

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
