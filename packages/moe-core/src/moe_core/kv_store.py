"""The seam between attention layers and wherever their keys and values live.

Dimension key: B batch rows, T new tokens, S key slots.

Attention layers know nothing about storage: they hand each pass's new entries to a `KVStore`
and attend over whatever it returns. moe-core's own caches (`KVCache`, growing; `StaticKVCache`,
fixed and driven from the device for graph capture) and moe-gen's micro-batch view of its host
pages all satisfy it, so the same layer code serves `generate`, graph-captured decode and
module-based batching.

`DecodeAttentionStore` is for stores that attend one query per row themselves, where the keys
lie (moe-gen's host pages, read in place by a CPU kernel): at decode an attention layer hands
them its queries and new entries instead of asking for every key back.

`SequenceKV` adds what `MoEForCausalLM.forward` needs to build masks and positions itself: which
key slots hold real tokens, which slots the new queries occupy, and where each row's positions
continue.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

__all__ = ["DecodeAttentionStore", "KVStore", "SequenceKV"]


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


@runtime_checkable
class DecodeAttentionStore(KVStore, Protocol):
    """A `KVStore` that attends a single new token per row over its own keys.

    Attention layers call `attend_decode` instead of `append` when a pass has one token per row
    and the store has the method; the store keeps the new entries exactly as `append` would.
    """

    def attend_decode(self, layer: int, queries: tuple[torch.Tensor, ...],
                      new: tuple[torch.Tensor, ...], value_index: int, mask: torch.Tensor,
                      scale: float) -> torch.Tensor:
        """Store `layer`'s new entries and attend.

        Args:
            layer: Decoder-layer index.
            queries: Per key part `[B, H, E_i]`: `queries[i]` scores against stored tensor
                `i` (GQA: the rotated queries against the keys; MLA: the absorbed no-rope
                query against the latent, and the rotated query against the rotary key).
            new: The new entries, as `append` takes them (each `[B, 1, ...]`).
            value_index: Which stored tensor holds the values (GQA: 1; MLA: 0, the latent).
            mask: Additive `[B, S]`, the last column the new token's, as `append`'s result
                would be masked.
            scale: Softmax scale.

        Returns:
            The attended values `[B, H, V]` in float32.
        """
        ...
