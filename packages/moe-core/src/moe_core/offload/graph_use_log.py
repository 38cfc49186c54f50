"""Expert uses of graph-captured decode steps, recorded on the device and counted on the host later.

Dimension key: N logged steps (at most `capacity`), T tokens of a step, J = T*K assignments.

The mapped path counts a layer's uses from Python after it enqueued the layer's compute
(`ExpertSlotCache.use_layer_map` keeps the routing tensor and counts it at the next host read).
A replayed graph runs no Python, and its routing tensor is one static buffer overwritten every
replay. So the captured step copies each layer's routing into row `step` of a per-layer log
(`index_copy_` at a device counter: one small kernel per layer), the host bumps the counter after
each replay and remembers the step's assignment count, and the next flush reads the logged rows
back and counts them exactly as eager uses are counted.
"""

from __future__ import annotations

import torch

__all__ = ["GraphUseLog"]


class GraphUseLog:
    """Per-layer routing logs of replayed steps.

    Attributes:
        capacity: Steps kept before the owner must flush.
        step: `[1]` device counter: the row the next replay writes.
    """

    def __init__(self, device: torch.device, capacity: int = 256) -> None:
        self.capacity = capacity
        self.step = torch.zeros(1, dtype=torch.long, device=device)
        self._logs: dict[tuple[int, int], torch.Tensor] = {}  # (layer, T) -> [capacity, J]
        self._sizes: list[int] = []  # T of each replayed step since the last drain

    def allocate(self, layer: int, expert_ids: torch.Tensor) -> None:
        """Outside a capture (the warm-up before it): make the log a captured call of this shape
        will write. Persistent buffers must not be allocated during a capture: the graph's
        memory pool hands blocks freed earlier in the same capture out again, so a kernel that
        runs before the allocation point at every replay would scribble over the log."""
        key = (layer, expert_ids.shape[0])
        if key not in self._logs:
            self._logs[key] = torch.zeros(self.capacity, expert_ids.numel(), dtype=torch.long,
                                          device=self.step.device)

    def record(self, layer: int, expert_ids: torch.Tensor) -> None:
        """Inside a capture: copy this call's `expert_ids` into its layer's log at `step`.

        Raises:
            RuntimeError: no log of this shape was allocated in the warm-up (`allocate`).
        """
        log = self._logs.get((layer, expert_ids.shape[0]))
        if log is None:
            raise RuntimeError(f"no use log for layer {layer} and {expert_ids.shape[0]} tokens: "
                               f"the step was not warmed up before its capture")
        log.index_copy_(0, self.step, expert_ids.reshape(1, -1))

    def replayed(self, num_tokens: int) -> bool:
        """After a replay of a step of `num_tokens` tokens: advance the counter. Returns whether
        the log is full (drain before the next replay)."""
        self.step.add_(1)
        self._sizes.append(num_tokens)
        return len(self._sizes) >= self.capacity

    def drain(self, layers: list[int]) -> list[tuple[int, list[int]]]:
        """The logged uses since the last drain, `(layer, ids of one call)` in step order (one
        host read per log), and an empty log."""
        if not self._sizes:
            return []
        n = len(self._sizes)
        on_host = {key: log[:n].tolist() for key, log in self._logs.items()}
        uses = []
        for i, size in enumerate(self._sizes):
            for layer in layers:
                rows = on_host.get((layer, size))
                if rows is not None:
                    uses.append((layer, rows[i]))
        self._sizes.clear()
        self.step.zero_()
        return uses
