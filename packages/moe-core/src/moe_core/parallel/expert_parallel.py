"""Expert parallelism: each rank computes the routed experts it owns, and the partial MoE
outputs are summed over the ranks.

Dimension key: T tokens, K experts per token, D hidden, E routed experts, M assignments (token,
expert) owned by this rank.

The dense layers are replicated: every rank runs the same attention, norms, routers and shared
experts on the same tokens, so every rank knows every token's routing without exchanging it.
For a MoE block, rank r computes `sum_j w[t, j] * expert[ids[t, j]](h[t])` over the assignments
whose expert it owns (through its own executor: its own slot cache, fed over its own PCIe link
from its own shard of host memory), zero elsewhere; one all-reduce (sum) of the `[T, D]` partial
outputs then gives every rank the whole MoE output. That is one all-reduce of the hidden state
per MoE layer whatever the routing; an all-to-all that sends each token only to the ranks of its
experts (and back) moves less when T is large and is the later optimisation (decision 0013).

Ranks stay in step because they run the same dense kernels on the same inputs (the all-reduce
hands every rank the same sum), and because every rank makes exactly one all-reduce per MoE
block call, even one that owns none of the call's experts.
"""

from __future__ import annotations

from typing import Protocol

import torch

from moe_core.experts import ExpertExecutor
from moe_core.model import MoEForCausalLM
from moe_core.parallel.shard_plan import ExpertShardPlan

__all__ = ["Collective", "ExpertParallelExecutor", "install_expert_parallel"]


class Collective(Protocol):
    """What expert parallelism needs from the process group (`RankGroup` is one)."""

    rank: int

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        """Sum `tensor` over the ranks, in place."""
        ...


class ExpertParallelExecutor:
    """`ExpertExecutor` of one MoE layer on one rank: this rank's experts through `inner`, the
    others' contributions by all-reduce.

    Attributes:
        inner: Runs this rank's experts (e.g. its `OffloadedExecutor` over its shard).
        owned: `[E]` bool on the compute device: the experts this rank owns.
        collective: Sums the partial outputs over the ranks.
        graph_safe: False: the owned assignments are found on the host, and a collective runs.
        accepts_float32_weights: As `inner`'s.
    """

    graph_safe = False

    def __init__(self, inner: ExpertExecutor, owned: torch.Tensor,
                 collective: Collective) -> None:
        self.inner = inner
        self.owned = owned
        self.collective = collective
        self.accepts_float32_weights = bool(getattr(inner, "accepts_float32_weights", False))

    def __call__(self, hidden: torch.Tensor, expert_ids: torch.Tensor,
                 weights: torch.Tensor) -> torch.Tensor:
        """See `ExpertExecutor`: `hidden` `[T, D]`, ids and weights `[T, K]` -> `[T, D]`, the
        same on every rank."""
        mine = self.owned[expert_ids]  # [T, K]
        tokens, picks = mine.nonzero(as_tuple=True)  # [M] each: the one host read of the call
        out = torch.zeros_like(hidden)  # [T, D]
        if tokens.numel():
            # Each owned assignment as a row of its own (K = 1): a token with two owned experts
            # appears twice, and index_add_ sums its two weighted outputs.
            part = self.inner(hidden[tokens], expert_ids[tokens, picks, None],
                              weights[tokens, picks, None])  # [M, D]
            out.index_add_(0, tokens, part.to(out.dtype))
        self.collective.all_reduce_sum(out)  # every rank, every call: the ranks stay paired
        return out


def install_expert_parallel(model: MoEForCausalLM, plan: ExpertShardPlan,
                            collective: Collective) -> dict[int, ExpertParallelExecutor]:
    """Wrap every MoE block's executor so this rank (`collective.rank`) computes only its own
    experts of `plan` and sums with the other ranks.

    The blocks' current executors become the inner ones: install offloading over this rank's
    shard first (`load_offloaded(..., experts=plan.owned(rank))`).

    Raises:
        ValueError: the plan's layers are not the model's MoE layers.
    """
    blocks = model.moe_blocks()
    if sorted(b.layer for b in blocks) != list(plan.moe_layers):
        raise ValueError(f"the plan covers MoE layers {list(plan.moe_layers)}, the model has "
                         f"{sorted(b.layer for b in blocks)}")
    executors = {}
    for block in blocks:
        owned = plan.owned_mask(block.layer, collective.rank).to(model.device)
        if owned.numel() != block.spec.num_experts:
            raise ValueError(f"the plan has {owned.numel()} experts in layer {block.layer}, "
                             f"the model {block.spec.num_experts}")
        executors[block.layer] = ExpertParallelExecutor(block.executor, owned, collective)
        block.set_executor(executors[block.layer])
    return executors
