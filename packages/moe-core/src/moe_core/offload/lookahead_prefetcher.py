"""`LookaheadPrefetcher`: the next layer's router applied to this layer's input guesses the next
layer's experts, which are prefetched before that layer routes.

Dimension key: T tokens of a call, D hidden, E routed experts, k' experts prefetched.

MoE-Infinity's observation (DESIGN.md; measured on the tiny model, docs/moe-infinity.md): layer
l+1's router on layer l's hidden state foresees layer l+1's experts (recall 77.6% at 2 experts
on the tiny model with this input, 92.8% at 4), where layer l's own ids are worse than chance.
The executor sees layer l's MoE-block input (normalised by layer l's norm), so that is what the
router of layer l+1 (`MoEBlock.gate.logits`) is applied to (moe-infinity's `block_input` form).
The softmax scores are summed over the call's tokens and the top k' experts of layer l+1 are
prefetched when the call of layer l ends. Under routing set by hand (benchmarks) the router no
longer routes, so the next layer's override is asked instead where it can say (a replayed
tape's recorded lookahead; a Zipf law's distribution): `lookahead_scores`.

Cost: one `[T, D] x [D, E]` product, a softmax and a top-k per layer on the device, and one read
of k' ids on the host. That read is a synchronisation: on CUDA the ids are copied to pinned
memory right behind the router (before layer l's experts are enqueued) and waited for with an
event at the end of the call, so it waits for the router, not for layer l's experts. On the copy
path the host reads each layer's routing anyway, so the wait costs nearly nothing; on the mapped
path (no host read otherwise) it costs one synchronisation per layer, which is why graph-captured
steps never run it. A layer whose successor is wholly resident is skipped without any device work
or read (`skipped_layers`).
"""

from __future__ import annotations

from itertools import pairwise
from typing import TYPE_CHECKING

import torch

from moe_core.expert_id import ExpertId

if TYPE_CHECKING:
    from moe_core.model import MoEForCausalLM
    from moe_core.moe_block import MoEBlock
    from moe_core.offload.slot_cache import ExpertSlotCache

__all__ = ["LookaheadPrefetcher", "lookahead_scores"]


def lookahead_scores(block: MoEBlock, hidden: torch.Tensor) -> torch.Tensor:
    """`[T, E]` float32: how likely each expert of `block` is for the tokens whose earlier
    layer's input is `hidden` `[T, D]`: the softmax of `block`'s router on `hidden`, or, when the
    block's routing is set by hand and says (`lookahead_scores` of a replayed tape or a Zipf
    law, see `routing_control`), that: the router no longer routes there."""
    override = getattr(block.routing_override, "lookahead_scores", None)
    if override is not None:
        scores = override(hidden)
        if scores is not None:
            return scores.float()
    return torch.softmax(block.gate.logits(hidden).float(), dim=-1)


class LookaheadPrefetcher:
    """A `Prefetcher` from the next layer's router on the current layer's input.

    Attributes:
        top: Experts of the next layer prefetched per call (k').
        guesses: Calls that made a guess (one host read each).
        skipped_layers: Calls skipped because the next layer was wholly resident.
    """

    def __init__(self, model: MoEForCausalLM, top: int | None = None) -> None:
        blocks = model.moe_blocks()
        if not blocks:
            raise ValueError("the model has no MoE blocks to prefetch for")
        num_experts = blocks[0].spec.num_experts
        self.top = min(num_experts, top if top is not None else blocks[0].spec.router.top_k)
        if self.top <= 0:
            raise ValueError(f"top must be positive, got {top}")
        self._next: dict[int, MoEBlock] = {a.layer: b for a, b in pairwise(blocks)}
        self._pending: tuple[int, torch.Tensor, torch.cuda.Event | None] | None = None
        self._host: torch.Tensor | None = None  # [k'] pinned, on CUDA
        self.guesses = 0
        self.skipped_layers = 0

    def begin_layer(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                    cache: ExpertSlotCache) -> None:
        """Start the guess for the next layer on the device (nothing when it is resident)."""
        self._pending = None
        nxt = self._next.get(layer)
        if nxt is None:
            return
        if cache.layer_map(nxt.layer).complete:
            self.skipped_layers += 1
            return
        with torch.no_grad():
            scores = lookahead_scores(nxt, hidden).sum(dim=0)  # [E]
            top = scores.topk(self.top).indices  # [k']
        if not top.is_cuda:
            self._pending = (nxt.layer, top, None)
            return
        if self._host is None:
            self._host = torch.empty(self.top, dtype=torch.long, pin_memory=True)
        self._host.copy_(top, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending = (nxt.layer, self._host, event)

    def end_layer(self, layer: int, cache: ExpertSlotCache) -> list[ExpertId]:
        """The next layer's guessed experts that are absent, best first."""
        if self._pending is None:
            return []
        nxt, top, event = self._pending
        self._pending = None
        if event is not None:
            event.synchronize()  # the router's ids have landed (not this layer's experts)
        self.guesses += 1
        guessed = [ExpertId(nxt, e) for e in top.tolist()]
        return [e for e in guessed if cache.is_absent(e)]

    def between_steps(self, cache: ExpertSlotCache) -> list[ExpertId]:
        """Nothing: without a layer's hidden state there is no lookahead."""
        return []

    def begin_sequence(self) -> None:
        """Nothing is kept between layers' calls but the guess in progress."""
        self._pending = None
