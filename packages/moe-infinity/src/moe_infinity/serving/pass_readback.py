"""Reading a pass's results on the host without waiting for the passes enqueued after it.

Dimension key: b rows of the pass, L MoE layers, E routed experts.

A copy from the device to ordinary (pageable) host memory is ordered on the stream and waits
for everything enqueued before it. The engine enqueues decode pass n+1 before it reads pass n
(docs/decisions/0017), so a plain `.cpu()` of pass n's results would wait for pass n+1 too.
Instead pass n's results (its routing counts and lookahead `[b, L, E]`, its next tokens `[b]`)
are copied into pinned buffers with `non_blocking=True` before pass n+1 is enqueued, and an
event is recorded after the copies: waiting for the event waits for pass n only. On the CPU
there is nothing to wait for: the values are taken at `start`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["PassReadback"]


class PassReadback:
    """Pinned host copies of a few device tensors: `start` enqueues them, `wait` returns them.

    One read at a time: `start`, then `wait`; a `start` before the previous read was waited for
    drops that read (its copies, on the same stream, land first). Each position of `start`'s
    tensors keeps its own pinned buffer, grown as needed.

    Attributes:
        device: Where the tensors read live.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buffers: list[torch.Tensor] = []  # per position, flat pinned, grown by doubling
        self._pending: list[torch.Tensor] | None = None  # views of the buffers (or CPU values)
        self._event: torch.cuda.Event | None = None

    def start(self, tensors: Sequence[torch.Tensor]) -> None:
        """Enqueue the copies of `tensors` (on the current stream, after the work that writes
        them) and mark their end."""
        if self.device.type != "cuda":
            self._pending = [t.detach().clone() for t in tensors]
            return
        pending = []
        for k, tensor in enumerate(tensors):
            view = self._buffer(k, tensor)
            view.copy_(tensor, non_blocking=True)
            pending.append(view)
        if self._event is None:
            self._event = torch.cuda.Event()
        self._event.record(torch.cuda.current_stream(self.device))
        self._pending = pending

    def wait(self) -> list[np.ndarray]:
        """The tensors given to `start`, as host arrays (copies: the buffers are reused), once
        their copies have landed.

        Raises:
            RuntimeError: nothing was started.
        """
        if self._pending is None:
            raise RuntimeError("PassReadback.wait without start")
        pending, self._pending = self._pending, None
        if self.device.type != "cuda":
            return [t.numpy() for t in pending]  # clones already
        assert self._event is not None
        self._event.synchronize()
        return [t.numpy().copy() for t in pending]

    def _buffer(self, k: int, like: torch.Tensor) -> torch.Tensor:
        """Position `k`'s pinned buffer as a `like`-shaped view (reallocated when too small or
        of another dtype)."""
        while len(self._buffers) <= k:
            self._buffers.append(torch.empty(0, dtype=like.dtype, pin_memory=True))
        buffer = self._buffers[k]
        n = like.numel()
        if buffer.dtype != like.dtype or buffer.numel() < n:
            size = max(n, 2 * buffer.numel()) if buffer.dtype == like.dtype else n
            buffer = self._buffers[k] = torch.empty(size, dtype=like.dtype, pin_memory=True)
        return buffer[:n].view(like.shape)
