"""A simple on-device KV cache for incremental decoding of a batch of ragged sequences.

Dimension key: B batch rows, T new tokens, S cache slots.

All rows share one slot axis: a forward pass of T tokens writes slots `[used, used + T)` of every
row. Padding tokens (from ragged prompts, left- or right-padded) occupy slots too but are marked
invalid, so no query ever attends to them; each row also keeps its own next position, so a
row's positions count only its real tokens. This is the scheme transformers uses for left-padded
batches, generalised to any padding, and it keeps every write a plain slice.

The cache is for the model's own eager `generate` and for tests; graph-captured decode uses
`StaticKVCache`, and the engines keep their KV elsewhere (host memory, paged) and plan its
traffic. All of them satisfy `moe_core.kv_store.KVStore`.
"""

from __future__ import annotations

import torch

__all__ = ["KVCache"]


class KVCache:
    """Per-layer key/value tensors for `batch_size` rows sharing one slot axis.

    Each attention layer stores whatever it needs (GQA: keys and values; MLA: its compressed
    latent and rotary key) as tensors whose first two dims are `[B, S]`.
    """

    def __init__(self, batch_size: int, capacity: int, device: torch.device | str = "cpu") -> None:
        if batch_size <= 0 or capacity <= 0:
            raise ValueError(f"KVCache needs a positive batch_size and capacity, got "
                             f"{batch_size} and {capacity}")
        self.batch_size = batch_size
        self.capacity = capacity
        self.device = torch.device(device)
        self.num_slots = 0  # slots written by committed passes
        self.valid = torch.zeros(
            batch_size, capacity, dtype=torch.bool, device=self.device)  # [B,S]
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=self.device)  # [B]
        self._layers: dict[int, tuple[torch.Tensor, ...]] = {}

    def reserve(self, num_new: int) -> None:
        """Make room for `num_new` more slots, doubling the capacity as needed."""
        needed = self.num_slots + num_new
        if needed <= self.capacity:
            return
        new_capacity = max(needed, 2 * self.capacity)
        self.valid = self._grow(self.valid, new_capacity)
        self._layers = {i: tuple(self._grow(t, new_capacity) for t in ts)
                        for i, ts in self._layers.items()}
        self.capacity = new_capacity

    @staticmethod
    def _grow(t: torch.Tensor, capacity: int) -> torch.Tensor:
        grown = t.new_zeros((t.shape[0], capacity, *t.shape[2:]))
        grown[:, : t.shape[1]] = t
        return grown

    def append(self, layer: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store one layer's new entries (each `[B, T, ...]`); return all of them.

        The returned tensors are `[B, used+T, ...]`.

        The slots become visible to later passes only after `commit`.
        """
        num_new = tensors[0].shape[1]
        self.reserve(num_new)
        stored = self._layers.get(layer)
        if stored is None:
            stored = tuple(t.new_zeros((self.batch_size, self.capacity, *t.shape[2:]))
                           for t in tensors)
            self._layers[layer] = stored
        end = self.num_slots + num_new
        for dst, src in zip(stored, tensors, strict=True):
            dst[:, self.num_slots : end] = src
        return tuple(t[:, :end] for t in stored)

    def commit(self, new_valid: torch.Tensor) -> None:
        """Finish a pass of T tokens: mark their slots valid where `new_valid` `[B, T]` is true."""
        num_new = new_valid.shape[1]
        self.reserve(num_new)
        self.valid[:, self.num_slots : self.num_slots + num_new] = new_valid
        self.next_position += new_valid.sum(dim=1)
        self.num_slots += num_new

    def key_valid(self, new_valid: torch.Tensor) -> torch.Tensor:
        """Validity of every key a pass with tokens `new_valid` `[B, T]` sees: `[B, used + T]`."""
        return torch.cat((self.valid[:, : self.num_slots], new_valid), dim=1)

    def begin(self, new_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """See `SequenceKV.begin`: keys `[B, used + T]`, the new tokens at slots `used + t`."""
        num_new = new_valid.shape[1]
        slots = torch.arange(self.num_slots, self.num_slots + num_new, device=new_valid.device)
        return self.key_valid(new_valid), slots

    def nbytes(self) -> int:
        """Bytes held by the stored tensors."""
        return sum(t.numel() * t.element_size() for ts in self._layers.values() for t in ts)
