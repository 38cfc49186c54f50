"""Routing set by hand, for benchmarks: a model's routers replaced by a known distribution.

Dimension key: T tokens, D hidden, E routed experts, K experts per token.

Why: models with dummy (random) weights route almost every decode token of a sequence to the same
experts (measured: 99.9% hit rate with 46% of the experts cached, batch 1), which flatters any
expert cache. Every benchmark where experts are cached or offloaded therefore sets its routing
explicitly (../shared/BENCHMARKS.md). Uniform random top-k is the worst case for a cache: each
token picks K distinct experts uniformly, independently of everything before.

The override draws on the device from torch's default generator, so a decode step that uses it
can still be captured as a CUDA graph (each replay draws afresh).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from moe_core.model import MoEForCausalLM

__all__ = ["UniformRouting", "uniform_routing"]


class UniformRouting:
    """Each token's K experts drawn uniformly without replacement, weighted 1/K each."""

    def __init__(self, num_experts: int, top_k: int) -> None:
        if not 0 < top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
        self.num_experts = num_experts
        self.top_k = top_k

    def __call__(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(expert_ids [T, K], weights [T, K] float32)` for `hidden` `[T, D]`."""
        t = hidden.shape[0]
        scores = torch.rand(t, self.num_experts, device=hidden.device)  # [T, E]
        ids = scores.topk(self.top_k, dim=-1).indices  # [T, K] distinct, uniform
        weights = torch.full((t, self.top_k), 1.0 / self.top_k, device=hidden.device)
        return ids, weights


@contextmanager
def uniform_routing(model: MoEForCausalLM) -> Iterator[None]:
    """Route every MoE block of `model` uniformly at random while inside (the override is put
    back as it was on exit)."""
    blocks = model.moe_blocks()
    previous = [block.routing_override for block in blocks]
    for block in blocks:
        block.routing_override = UniformRouting(block.spec.num_experts, block.spec.router.top_k)
    try:
        yield
    finally:
        for block, old in zip(blocks, previous, strict=True):
            block.routing_override = old
