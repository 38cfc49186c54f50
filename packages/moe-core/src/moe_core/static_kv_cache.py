"""A fixed-capacity KV cache whose whole state lives on the device, so a decode step over it can be
captured once as a CUDA graph and replayed at every later position.

Dimension key: B batch rows, T new tokens, C capacity (key slots), b rows of a view.

`KVCache` keeps its fill level on the host and returns slices that grow each step: every step has
new shapes, so nothing can be captured. Here the buffers are allocated once at full capacity, the
slot the next pass writes is a device tensor (`slot`), writes are `index_copy_` at device indices,
and every pass attends over all C slots, the empty ones hidden by the mask (`valid`). A replayed
graph therefore reads and advances the same tensors the eager passes use: the prompt is prefilled
eagerly through `MoEForCausalLM.forward`, and the captured decode step continues from there.

The slot axis is shared by the rows, as in `KVCache`: a pass of T tokens writes slots
`[slot, slot + T)` of every row, rows without a real token there mark them invalid.
"""

from __future__ import annotations

import torch

__all__ = ["StaticKVCache"]


class StaticKVCache:
    """Per-layer key/value buffers of `batch_size` rows and `capacity` slots, state on the device.

    Attributes:
        batch_size: Rows (B).
        capacity: Slots per row (C).
        device: Where the buffers live.
        valid: `[B, C]` whether a slot holds a real token of its row.
        next_position: `[B]` position of each row's next real token.
        slot: `[1]` first slot the next pass writes (device; advanced by `commit`).
    """

    def __init__(self, batch_size: int, capacity: int, device: torch.device | str = "cpu") -> None:
        if batch_size <= 0 or capacity <= 0:
            raise ValueError(f"StaticKVCache needs a positive batch_size and capacity, got "
                             f"{batch_size} and {capacity}")
        self.batch_size = batch_size
        self.capacity = capacity
        self.device = torch.device(device)
        self.valid = torch.zeros(batch_size, capacity, dtype=torch.bool, device=self.device)
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=self.device)
        self.slot = torch.zeros(1, dtype=torch.long, device=self.device)
        self._layers: dict[int, tuple[torch.Tensor, ...]] = {}
        self._write: torch.Tensor | None = None  # [T] slots of the pass in progress
        self._parent: StaticKVCache | None = None  # set on row views

    # The SequenceKV protocol ------------------------------------------------------------------

    def begin(self, new_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """See `SequenceKV.begin`: all C slots are keys; the new tokens sit at `slot + t`."""
        num_new = new_valid.shape[1]
        write = self.slot + torch.arange(num_new, device=self.device)  # [T]
        self._root()._write = write
        return self.valid.index_copy(1, write, new_valid.to(torch.bool)), write  # [B, C], [T]

    def append(self, layer: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Write `layer`'s new entries `[B, T, ...]` at the pass's slots; return the whole
        buffers `[B, C, ...]` (what the mask hides is never attended)."""
        root = self._root()
        if root._write is None:
            raise RuntimeError("StaticKVCache.append outside a pass (call begin first)")
        stored = root._buffers(layer, tensors)
        out = []
        for buffer, new in zip(stored, tensors, strict=True):
            rows = buffer[: self.batch_size]
            rows.index_copy_(1, root._write, new.to(rows.dtype))
            out.append(rows)
        return tuple(out)

    def write_target(self, layer: int, tails: tuple[tuple[int, ...], ...], dtype: torch.dtype
                     ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """For kernels that write a pass's new entries themselves (`kernels.qkv_rope_store`):
        the layer's buffers `[B, C, *tail]` (allocated on first use) and the pass's slots `[T]`.
        What they write there is what `append` would have written."""
        root = self._root()
        if root._write is None:
            raise RuntimeError("StaticKVCache.write_target outside a pass (call begin first)")
        shapes = tuple((self.capacity, *tail) for tail in tails)
        stored = root._allocate(layer, shapes, (dtype,) * len(tails))
        return tuple(buffer[: self.batch_size] for buffer in stored), root._write

    def commit(self, new_valid: torch.Tensor) -> None:
        """See `SequenceKV.commit`; advances `slot` on the device."""
        root = self._root()
        assert root._write is not None
        self.valid.index_copy_(1, root._write, new_valid.to(torch.bool))
        self.next_position += new_valid.sum(dim=1)
        self.slot += new_valid.shape[1]
        root._write = None

    # Driving it -------------------------------------------------------------------------------

    def rows(self, num_rows: int) -> StaticKVCache:
        """A view of the first `num_rows` rows sharing every buffer and the slot counter (a
        smaller batch bucket over the same cache)."""
        if not 0 < num_rows <= self.batch_size:
            raise ValueError(f"rows must be in [1, {self.batch_size}], got {num_rows}")
        root = self._root()
        view = StaticKVCache.__new__(StaticKVCache)
        view.batch_size, view.capacity, view.device = num_rows, self.capacity, self.device
        view.valid = root.valid[:num_rows]
        view.next_position = root.next_position[:num_rows]
        view.slot = root.slot
        view._layers, view._write, view._parent = root._layers, None, root
        return view

    def state(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A copy of the fill state (slot, valid, positions) for `restore`: what a run that is
        to leave no trace (a warm-up before a capture) must put back; buffer entries past the
        fill level need no restoring, they are masked and rewritten."""
        root = self._root()
        return root.slot.clone(), root.valid.clone(), root.next_position.clone()

    def restore(self, state: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        """Put back a fill state taken with `state`."""
        root = self._root()
        for mine, saved in zip((root.slot, root.valid, root.next_position), state, strict=True):
            mine.copy_(saved)

    def reset(self) -> None:
        """Forget every sequence (the buffers keep their memory; stale entries are masked)."""
        root = self._root()
        root.valid.zero_()
        root.next_position.zero_()
        root.slot.zero_()
        root._write = None

    def nbytes(self) -> int:
        """Bytes held by the stored tensors."""
        return sum(t.numel() * t.element_size() for ts in self._root()._layers.values()
                   for t in ts)

    # Internals --------------------------------------------------------------------------------

    def _root(self) -> StaticKVCache:
        return self if self._parent is None else self._parent

    def _buffers(self, layer: int, like: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """The layer's buffers for entries shaped like `like` `[B, T, ...]`."""
        return self._allocate(layer, tuple((self.capacity, *t.shape[2:]) for t in like),
                              tuple(t.dtype for t in like))

    def _allocate(self, layer: int, shapes: tuple[tuple[int, ...], ...],
                  dtypes: tuple[torch.dtype, ...]) -> tuple[torch.Tensor, ...]:
        """The layer's buffers `[B, *shape]`, allocated at full size on first use (before any
        capture: the prefill writes every layer first)."""
        stored = self._layers.get(layer)
        if stored is None:
            stored = tuple(torch.zeros((self.batch_size, *shape), dtype=dtype, device=self.device)
                           for shape, dtype in zip(shapes, dtypes, strict=True))
            self._layers[layer] = stored
        return stored
