"""How the ranks of an expert-parallel server stay in step: rank 0 decides, the others follow.

Rank 0 runs the HTTP front end, the scheduler, sampling and tracing; every rank runs every pass
of the model (the dense layers are replicated, each rank computes its own experts, and the MoE
outputs are summed over the ranks: `moe_core.parallel`). Before each pass rank 0 broadcasts a
`PassOrder`: the rows of the pass (each sequence's KV blocks, cached length and new tokens),
which is everything a rank needs to build the same `RaggedPass` over its own copy of the KV
pool; plus the activation-aware policy's latest prediction, so every rank's cache evicts by the
same forecast. The other ranks then run exactly the passes rank 0 runs, in the same order, so
their all-reduces pair up; they never sample, and their logits are dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from moe_core import RankGroup

from moe_infinity.policies import ActivationAwarePolicy
from moe_infinity.serving.kv_pool import KVPool
from moe_infinity.serving.ragged_pass import PassRow, RaggedPass
from moe_infinity.serving.serving_model import ServingModel
from moe_infinity.serving.step_pass import run_pass

__all__ = ["PassFollowers", "PassOrder", "PoolShape", "follow"]


@dataclass(frozen=True)
class PassOrder:
    """One pass, as rank 0 sends it.

    Attributes:
        rows: The pass's rows, in order.
        need: The activation-aware policy's prediction `[L, E]` when it changed since the last
            order, else None.
    """

    rows: tuple[PassRow, ...]
    need: np.ndarray | None = None


@dataclass(frozen=True)
class PoolShape:
    """Rank 0's KV pool, which every rank copies (block tables index all of them alike)."""

    num_blocks: int
    block_tokens: int


class PassFollowers(Protocol):
    """The other ranks, as rank 0's engine sees them."""

    @property
    def is_alive(self) -> bool:
        """Every rank still runs and none is out of step."""
        ...

    def run(self, rows: list[PassRow], local: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Order every rank to run the pass of `rows`, then run it here (`local`, returning the
        logits)."""
        ...

    def close(self) -> None:
        """Stop the other ranks and wait for them to exit."""
        ...


def follow(served: ServingModel, pool: KVPool, group: RankGroup) -> int:
    """A rank other than 0: run every pass rank 0 orders, until it says stop (None). Returns
    the number of passes run."""
    policy = served.policy
    device = served.model.device
    passes = 0
    while True:
        order = group.broadcast()
        if order is None:
            return passes
        if not isinstance(order, PassOrder):
            raise TypeError(f"rank {group.rank} got {type(order).__name__}, not a PassOrder")
        if order.need is not None and isinstance(policy, ActivationAwarePolicy):
            policy.update(order.need)
        run_pass(served.model, RaggedPass(list(order.rows), pool, device), pool)
        passes += 1
