"""Per-layer prefetch counters: how many prefetches each MoE layer received, used and wasted.

The totals live in `OffloadStats` (`prefetches_issued`, `prefetches_used`, `prefetches_wasted`);
this breaks them down by the layer the prefetched expert belongs to, which tells where a
predictor guesses well (the lookahead covers every layer but the first; a trace-based guess for
the first layer of the next token is the weakest).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LayerPrefetches", "PrefetchCounts"]


@dataclass
class LayerPrefetches:
    """One layer's prefetches.

    Attributes:
        issued: Prefetch copies submitted for the layer's experts.
        used: Prefetched experts used before being evicted.
        wasted: Prefetched experts evicted, or cancelled, without a use.
    """

    issued: int = 0
    used: int = 0
    wasted: int = 0


class PrefetchCounts:
    """`LayerPrefetches` by decoder-layer index, created on first count."""

    def __init__(self) -> None:
        self._layers: dict[int, LayerPrefetches] = {}

    def of(self, layer: int) -> LayerPrefetches:
        """The counters of `layer` (zero until counted)."""
        counts = self._layers.get(layer)
        if counts is None:
            counts = self._layers[layer] = LayerPrefetches()
        return counts

    def by_layer(self) -> dict[int, LayerPrefetches]:
        """A copy of every counted layer's counters, by layer index in order."""
        return {layer: LayerPrefetches(c.issued, c.used, c.wasted)
                for layer, c in sorted(self._layers.items())}
