"""What every layer's attention needs for one pass besides its input: rotary tables and masks.

Dimension key: B batch rows, T new tokens, S key slots, R rotary channels.

Built once per pass (by `MoEForCausalLM.attention_inputs`, or by an engine from its own batch
layout) and handed to each `DecoderLayer.attend`; a layer with a sliding window picks the
windowed mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["AttentionInputs", "position_mask", "slot_mask"]


@dataclass(frozen=True)
class AttentionInputs:
    """Rotary tables and additive masks of one pass.

    Attributes:
        rope: `(cos, sin)`, each `[B, T, R]`.
        mask: Additive `[B, 1, T, S]` (0 where allowed, the dtype's most negative value
            elsewhere).
        window_mask: The same with the sliding window applied, for the layers that have one
            (None when no layer does).
    """

    rope: tuple[torch.Tensor, torch.Tensor]
    mask: torch.Tensor
    window_mask: torch.Tensor | None = None

    def mask_for(self, sliding: bool) -> torch.Tensor:
        """The mask of a layer with (`sliding`) or without a sliding window."""
        if sliding and self.window_mask is not None:
            return self.window_mask
        return self.mask


def slot_mask(key_valid: torch.Tensor, query_slots: torch.Tensor, sliding_window: int | None,
              dtype: torch.dtype) -> torch.Tensor:
    """Additive mask `[B, 1, T, S]`: causal by slot, keys that hold no real token hidden, and
    keys more than `sliding_window` slots back hidden if a window is set.

    Args:
        key_valid: `[B, S]` whether each key slot holds a real token.
        query_slots: `[T]` the slot of each query (a device tensor, so a captured pass can
            replay at later slots).
        sliding_window: Window length in slots, or None.
        dtype: The activation dtype (the mask uses its most negative finite value, so a query
            with nothing to attend to stays finite instead of turning into NaN).
    """
    q_slot = query_slots[:, None]  # [T, 1]
    k_slot = torch.arange(key_valid.shape[1], device=key_valid.device)[None, :]  # [1, S]
    allowed = k_slot <= q_slot  # [T, S]
    if sliding_window is not None:
        allowed = allowed & (q_slot - k_slot < sliding_window)
    allowed = allowed[None] & key_valid[:, None, :]  # [B, T, S]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=key_valid.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]  # [B, 1, T, S]


def position_mask(query_pos: torch.Tensor, key_pos: torch.Tensor, key_valid: torch.Tensor,
                  sliding_window: int | None, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask `[B, 1, T, S]` of a batch whose rows keep their keys in their own order
    (paged or ragged KV): causal by token position, keys that hold no real token hidden, keys
    `sliding_window` or more positions back hidden if a window is set.

    Args:
        query_pos: `[B, T]` position of each query token.
        key_pos: `[B, S]` position of each key.
        key_valid: `[B, S]` whether each key holds a real token (every row needs one at or
            before each of its queries, or that query row is all masked).
        sliding_window: Window length in positions, or None.
        dtype: The activation dtype (its most negative finite value hides a key).
    """
    q = query_pos[:, :, None]  # [B, T, 1]
    k = key_pos[:, None, :]  # [B, 1, S]
    allowed = (k <= q) & key_valid[:, None, :]  # [B, T, S]
    if sliding_window is not None:
        allowed &= q - k < sliding_window
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]
