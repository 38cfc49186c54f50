"""The `Prefetcher` protocol: what guesses the experts of later layers for the on-demand runtime.

Dimension key: T tokens of a call, K experts per token, D hidden.

The on-demand executor (`OffloadedExecutor`) calls a prefetcher twice per MoE layer call, around
the layer's own work:

1. `begin_layer(layer, hidden, expert_ids, cache)` before the layer computes: the layer's input
   `hidden` `[T, D]` and routing `expert_ids` `[T, K]` as device tensors. Device work only
   (e.g. the next layer's router on `hidden`), plus what the prefetcher must tell its eviction
   policy before the layer's misses take slots; a host read here is a synchronisation.
2. `end_layer(layer, cache)` once the layer's compute is enqueued: the experts to prefetch (of
   later layers, most wanted first), which the runtime submits through the cache's `prefetch`
   (the prefetch lane: demand copies overtake them). Asking after the layer acquired its own
   experts keeps a prefetch from evicting one the layer is about to use.

A captured decode step cannot run Python, so neither is called under CUDA-graph capture (nor in
the runner's warm-up runs). Instead, the cache calls `between_steps(cache)` before every replay
(its `GraphHooks.before_replay`): what to prefetch for the next token from what the prefetcher
knows without per-layer hidden states. `begin_sequence` marks a new request (engines call
`OffloadRuntime.begin_sequence`).

A prefetch never changes results: a wrong guess costs a copy and, perhaps, a useful slot.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

from moe_core.expert_id import ExpertId

if TYPE_CHECKING:
    from moe_core.offload.slot_cache import ExpertSlotCache

__all__ = ["Prefetcher"]


@runtime_checkable
class Prefetcher(Protocol):
    """Guesses the experts later layers will use, for the on-demand runtime to prefetch."""

    def begin_layer(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                    cache: ExpertSlotCache) -> None:
        """MoE layer `layer` is about to run on `hidden` `[T, D]` with routing `expert_ids`
        `[T, K]` (device tensors)."""
        ...

    def end_layer(self, layer: int, cache: ExpertSlotCache) -> Sequence[ExpertId]:
        """Layer `layer`'s compute is enqueued: the experts to prefetch now, most wanted first
        (resident ones are skipped by the cache)."""
        ...

    def between_steps(self, cache: ExpertSlotCache) -> Sequence[ExpertId]:
        """Before a replayed (graph-captured) decode step: the experts to prefetch for it."""
        ...

    def begin_sequence(self) -> None:
        """A new request starts (forget the last one's state)."""
        ...
