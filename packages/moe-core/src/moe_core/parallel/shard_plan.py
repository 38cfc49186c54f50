"""Which rank owns each routed expert under expert parallelism.

Dimension key: L MoE layers, E routed experts per layer, R ranks.

Every rank holds the dense layers whole; the routed experts of each layer are split into R
disjoint shards, one per rank, so each rank's host store, GPU slots and PCIe link carry only its
own experts. Shards are of equal size (within one expert), so every rank needs the same host
memory and slots; within that, `balanced` spreads the measured traffic (activation counts, e.g.
a trace collection's) so no rank's link carries most of the hot experts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from moe_core.expert_id import ExpertId

__all__ = ["ExpertShardPlan"]


@dataclass(frozen=True)
class ExpertShardPlan:
    """The owner rank of every routed expert.

    Attributes:
        num_ranks: R.
        owners: MoE layer (decoder-layer index) -> the owner rank of each of its experts `[E]`.
    """

    num_ranks: int
    owners: Mapping[int, tuple[int, ...]]

    def __post_init__(self) -> None:
        if self.num_ranks < 1:
            raise ValueError(f"num_ranks must be at least 1, got {self.num_ranks}")
        if not self.owners:
            raise ValueError("owners must name at least one MoE layer")
        sizes = {len(o) for o in self.owners.values()}
        if len(sizes) != 1:
            raise ValueError(f"owners: every layer must have the same number of experts, got "
                             f"{sorted(sizes)}")
        for layer, owners in self.owners.items():
            bad = [r for r in owners if not 0 <= r < self.num_ranks]
            if bad:
                raise ValueError(f"owners of layer {layer}: ranks {bad} are not in "
                                 f"0..{self.num_ranks - 1}")

    @classmethod
    def round_robin(cls, moe_layers: Sequence[int], num_experts: int,
                    num_ranks: int) -> ExpertShardPlan:
        """Expert e of the i-th MoE layer goes to rank (e + i) mod R: equal shards, and where
        R does not divide E the extra experts fall on a different rank in each layer."""
        _check_sizes(num_experts, num_ranks)
        return cls(num_ranks, {layer: tuple((e + i) % num_ranks for e in range(num_experts))
                               for i, layer in enumerate(moe_layers)})

    @classmethod
    def balanced(cls, moe_layers: Sequence[int], counts: np.ndarray,
                 num_ranks: int) -> ExpertShardPlan:
        """Shards of equal size (within one expert) that spread `counts` `[L, E]` (tokens
        routed to each expert, e.g. summed over a trace collection) evenly: per layer, the
        busiest expert first goes to the least loaded rank with room (longest processing time
        first; ties to the lower expert and rank, so every process computes the same plan)."""
        counts = np.asarray(counts, dtype=np.float64)
        if counts.ndim != 2 or counts.shape[0] != len(moe_layers):
            raise ValueError(f"counts must be [{len(moe_layers)}, E], got {list(counts.shape)}")
        num_experts = counts.shape[1]
        _check_sizes(num_experts, num_ranks)
        owners: dict[int, tuple[int, ...]] = {}
        for i, layer in enumerate(moe_layers):
            room = [num_experts // num_ranks + (r < num_experts % num_ranks)
                    for r in range(num_ranks)]
            load = [0.0] * num_ranks
            owner = [0] * num_experts
            for e in sorted(range(num_experts), key=lambda e: (-counts[i, e], e)):
                rank = min((r for r in range(num_ranks) if room[r] > 0),
                           key=lambda r: (load[r], r))
                owner[e] = rank
                room[rank] -= 1
                load[rank] += counts[i, e]
            owners[layer] = tuple(owner)
        return cls(num_ranks, owners)

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """The MoE layers, in order."""
        return tuple(sorted(self.owners))

    def owner(self, expert: ExpertId) -> int:
        """The rank that holds and computes `expert`."""
        return self.owners[expert.layer][expert.expert]

    def owned(self, rank: int) -> list[ExpertId]:
        """The experts of `rank`, layer by layer."""
        return [ExpertId(layer, e) for layer in self.moe_layers
                for e, r in enumerate(self.owners[layer]) if r == rank]

    def owned_mask(self, layer: int, rank: int) -> torch.Tensor:
        """`[E]` bool: which experts of `layer` `rank` owns."""
        return torch.tensor([r == rank for r in self.owners[layer]], dtype=torch.bool)


def _check_sizes(num_experts: int, num_ranks: int) -> None:
    if num_ranks < 1:
        raise ValueError(f"num_ranks must be at least 1, got {num_ranks}")
    if num_experts < num_ranks:
        raise ValueError(f"{num_ranks} ranks for {num_experts} experts per layer: a rank "
                         "would hold no expert")
