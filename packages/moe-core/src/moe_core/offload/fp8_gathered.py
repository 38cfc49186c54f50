"""Small-batch expert compute over FP8 blocks: gather the assignments' blocks as they are stored,
dequantise only those, then the usual gathered products.

Dimension key: T tokens, K experts per token, W blocks to gather from, N block bytes, D hidden,
I expert width.

Why this order: the blocks a call reads (from a slot pool or from the mapped fetch's rows) are
e4m3 weights with their scales (`fp8.py`), one byte a weight. Gathering T*K of them moves half
the bytes a bf16 gather does, and dequantising after the gather touches only the T*K experts the
call uses, never the whole pool. Every step is a fixed-shape device operation (an index select,
a widening copy, a multiply), so a captured decode step replays it unchanged.
"""

from __future__ import annotations

import torch

from moe_core.gathered_experts import gathered_experts
from moe_core.offload.layout import ExpertLayout

__all__ = ["gathered_fp8_experts"]


def gathered_fp8_experts(hidden: torch.Tensor, index: torch.Tensor | None,
                         weights: torch.Tensor, layout: ExpertLayout,
                         rows: torch.Tensor) -> torch.Tensor:
    """`gathered_experts` over FP8 blocks, computed in `hidden`'s dtype.

    Args:
        hidden: `[T, D]`.
        index: `[T, K]` rows of `rows` each assignment reads (e.g. slot ids); None when `rows`
            is already one row per assignment (`W = T*K`, row `t*K + k`).
        weights: `[T, K]` routing weights.
        layout: An FP8 layout (`layout.is_fp8`).
        rows: `[W, N]` FP8 blocks (a pool's slots, or the mapped fetch's rows; a zero row is an
            expert that contributes nothing).

    Returns:
        `[T, D]` in `hidden`'s dtype.
    """
    if index is not None:  # [T*K, N]: half a bf16 gather (as bytes: any device indexes those)
        rows = rows.view(torch.uint8)[index.reshape(-1)].view(rows.dtype)
    gate_up, down = layout.dequantized_grouped(rows, hidden.dtype)  # [T*K, 2I, D], [T*K, D, I]
    i = layout.intermediate_size
    return gathered_experts(hidden, None, weights, gate_up[:, :i], gate_up[:, i:], down)
