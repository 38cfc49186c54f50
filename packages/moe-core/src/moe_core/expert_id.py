"""The one small type that names an expert: (layer, expert)."""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["ExpertId"]


class ExpertId(NamedTuple):
    """One routed expert of one MoE layer.

    Attributes:
        layer: Index of the decoder layer (0-based, counting dense layers too).
        expert: Index of the routed expert inside that layer's MoE block.
    """

    layer: int
    expert: int
