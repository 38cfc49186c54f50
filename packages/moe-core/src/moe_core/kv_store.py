"""The seam between attention layers and wherever their keys and values live.

Dimension key: B batch rows, T new tokens, S key slots.

Attention layers know nothing about storage: they hand each pass's new entries to a `KVStore`
and attend over whatever it returns. moe-core's own caches (`KVCache`, growing; `StaticKVCache`,
fixed and driven from the device for graph capture) and moe-gen's micro-batch view of its host
pages all satisfy it, so the same layer code serves `generate`, graph-captured decode and
module-based batching.

`SequenceKV` adds what `MoEForCausalLM.forward` needs to build masks and positions itself: which
key slots hold real tokens, which slots the new queries occupy, and where each row's positions
continue.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

__all__ = ["KVStore", "SequenceKV"]


@runtime_checkable
class KVStore(Protocol):
    """Keeps one pass's keys and values per layer and returns everything a layer attends over."""

    def append(self, layer: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store `layer`'s new entries (each `[B, T, ...]`: GQA keys and values, or MLA's latent
        and rotary key) and return every stored entry of that layer, `[B, S, ...]`, the new ones
        included. Slots the pass should not see are hidden by the caller's mask."""
        ...


@runtime_checkable
class SequenceKV(KVStore, Protocol):
    """A `KVStore` that tracks whole sequences on one slot axis shared by the batch rows.

    Attributes:
        next_position: `[B]` position of each row's next real token.
    """

    next_position: torch.Tensor

    def begin(self, new_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Start a pass of T tokens, `new_valid` `[B, T]` marking the real ones.

        Returns:
            `(key_valid [B, S], query_slots [T])`: whether each key slot the pass attends over
            holds a real token (the new ones included), and the slot of each new token.
        """
        ...

    def commit(self, new_valid: torch.Tensor) -> None:
        """Finish the pass begun with the same `new_valid`: its real tokens become visible to
        later passes and advance their rows' positions."""
        ...
