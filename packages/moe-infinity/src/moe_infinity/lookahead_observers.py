"""Lookahead observers: layer l+1's router applied to layer l's hidden state, wired in as each
MoE layer's `mix_observer` (the tracer's and the live tracer's shared wiring).

Each MoE layer except the last gets `make(row, next_layer, previous)`, with `row` the MoE row of
the next layer (its index among the MoE layers) and `previous` the observer it replaces, which
the new one is expected to chain to.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

from moe_core import DecoderLayer, MixObserver, MoEBlock, MoEForCausalLM

__all__ = ["attach_lookahead", "detach_lookahead"]

LookaheadFactory = Callable[[int, DecoderLayer, MixObserver | None], MixObserver]


def attach_lookahead(model: MoEForCausalLM, blocks: list[MoEBlock],
                     make: LookaheadFactory) -> list[MixObserver | None]:
    """Install `make`'s observers on every MoE layer with a next one; returns every layer's
    previous `mix_observer`, for `detach_lookahead`."""
    layers = model.layers
    previous = [layer.mix_observer for layer in layers]
    for row, (block, nxt) in enumerate(pairwise(blocks)):
        layer = layers[block.layer]
        layer.mix_observer = make(row + 1, layers[nxt.layer], layer.mix_observer)
    return previous


def detach_lookahead(model: MoEForCausalLM, previous: list[MixObserver | None]) -> None:
    """Put back the observers `attach_lookahead` replaced."""
    for layer, observer in zip(model.layers, previous, strict=True):
        layer.mix_observer = observer
