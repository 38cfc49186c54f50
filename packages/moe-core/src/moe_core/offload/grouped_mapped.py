"""Decode calls above the gather limit on the mapped path: the call's distinct experts found on the
device, read in fixed-size chunks from their slots or straight from pinned host memory, and every
token of the call run through every expert of a chunk, all without a host synchronisation, so the
call can be captured in a CUDA graph.

Dimension key: T tokens, K experts per token, J = T*K assignments, E experts per layer, C experts
per chunk, P = chunks * C places for distinct experts, D hidden, I expert width, N block elements.

Why: the mapped path (`mapped_fetch.fetch_rows`, decision 0004) builds one expert row per
assignment, so its workspace grows with T*K and stops at the gather limit: T <= 3 at
Qwen3-30B-A3B shapes (top-8, 9.4 MB experts, 256 MiB). Above it calls took the copy path, which
reads the routing on the host in every layer and cannot be captured: batch 4 decoded at 177-200
ms per step on the H200 where its missed bytes take ~70-80 ms over PCIe (decision 0016). Here a
call's workspace is bounded by the chunk, not by T*K: each distinct expert is read once, into one
of C rows, and the next chunk reuses the memory.

Shapes are fixed by the call's shape alone: P covers the most distinct experts the call can have
(min(J, E)), the chunk count and size follow from P and the workspace, and the places beyond the
distinct count are padding that the fetch does not read (`MappedFetcher.fetch_blocks`) and the
sum leaves out. Their products still run over the chunk's rows (HBM reads of at most C blocks per
padded chunk); under uniform routing at decode batch sizes nearly every place is used.

Each token runs through every expert of a chunk, weighted by its routing weight for that expert
(zero where the token did not pick it): at decode T is a handful, so the products stay bound by
reading each expert's weights once, whatever T is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moe_core.offload.layout import ExpertLayout
from moe_core.offload.mapped_fetch import MappedFetcher

__all__ = ["GROUPED_LIMIT_ASSIGNMENTS", "GroupedPlan", "distinct_experts",
           "grouped_mapped_experts"]

GROUPED_LIMIT_ASSIGNMENTS = 128
"""Most assignments (T*K) of a call on the grouped mapped path: decode batches up to 16 at top-8.
Larger calls (prefill) take the copy path, which admits their misses to the cache."""


@dataclass(frozen=True)
class GroupedPlan:
    """How one call shape's distinct experts are processed: `num_chunks` chunks of `chunk_size`.

    Attributes:
        num_chunks: Chunks per call (fixed by the call's shape, so a captured call is static).
        chunk_size: C, experts per chunk (rows of the workspace).
    """

    num_chunks: int
    chunk_size: int

    def __post_init__(self) -> None:
        if self.num_chunks <= 0 or self.chunk_size <= 0:
            raise ValueError(f"GroupedPlan num_chunks and chunk_size must be positive, got "
                             f"{self.num_chunks} and {self.chunk_size}")

    @classmethod
    def for_call(cls, num_assignments: int, num_experts: int, expert_bytes: int,
                 workspace_bytes: int) -> GroupedPlan:
        """The plan of a call of `num_assignments` (J): places for min(J, E) distinct experts in
        as few chunks as a workspace of `workspace_bytes` allows (at least one expert per chunk),
        spread evenly so the last chunk is not mostly padding."""
        most = min(num_assignments, num_experts)
        per_chunk = max(1, workspace_bytes // expert_bytes)
        chunks = -(-most // per_chunk)
        return cls(chunks, -(-most // chunks))

    @property
    def num_places(self) -> int:
        """P: places for distinct experts, over all chunks."""
        return self.num_chunks * self.chunk_size


def distinct_experts(expert_ids: torch.Tensor, num_places: int) -> tuple[torch.Tensor,
                                                                         torch.Tensor]:
    """The distinct ids of `expert_ids` `[T, K]` in ascending order, padded to `num_places`,
    computed on the device with fixed shapes (no host read).

    Returns:
        `(ids [P], live [P])`: the distinct ids first, then padding (id 0); `live` is False on
        padding. P must be at least the distinct count (min(J, E) always is); distinct ids past
        P would be lost, so callers size P by `GroupedPlan.for_call`.

    Raises:
        ValueError: `num_places` is not positive.
    """
    flat = expert_ids.reshape(-1)  # [J]
    if num_places <= 0:
        raise ValueError(f"num_places must be positive, got {num_places}")
    ordered = torch.sort(flat).values  # [J]
    new = torch.ones_like(ordered, dtype=torch.bool)  # [J] first of its run
    new[1:] = ordered[1:] != ordered[:-1]
    place = new.cumsum(0) - 1  # [J] each run's place among the distinct ids
    # Every repeat goes to one spare place past the end (which of them lands there is moot).
    target = torch.where(new, place, num_places)
    ids = torch.zeros(num_places + 1, dtype=torch.long, device=flat.device)
    ids.scatter_(0, target, ordered.to(torch.long))
    live = torch.arange(num_places, device=flat.device) < new.sum()  # [P]
    return ids[:num_places], live


def grouped_mapped_experts(hidden: torch.Tensor, expert_ids: torch.Tensor,
                           weights: torch.Tensor, fetcher: MappedFetcher, layer: int,
                           lut: torch.Tensor, plan: GroupedPlan) -> torch.Tensor:
    """`sum_k weights[t, k] * expert(expert_ids[t, k])(hidden[t])` for gated SiLU experts, each
    distinct expert read once from its slot or from host memory (`lut`), chunk by chunk.

    Args:
        hidden: `[T, D]`.
        expert_ids: `[T, K]` routed experts of `layer` (distinct within a row).
        weights: `[T, K]` routing weights.
        fetcher: Reads the experts' blocks (`MappedFetcher.fetch_blocks`).
        layer: Decoder-layer index.
        lut: `[E]` slot of each expert, -1 where it is read from host memory.
        plan: Chunks for this call shape (`GroupedPlan.for_call`; at least min(J, E) places).

    Returns:
        `[T, D]` in `hidden`'s dtype; products run in the weights' dtype (FP8 blocks
        dequantised to `hidden`'s), the sum over experts in float32.
    """
    t = hidden.shape[0]
    expert_ids = expert_ids.to(torch.long)  # scatter indices
    layout = fetcher.store.layout
    num_experts = fetcher.store.num_experts
    ids, live = distinct_experts(expert_ids, plan.num_places)  # [P], [P]
    dense = torch.zeros(t, num_experts, dtype=torch.float32, device=hidden.device)  # [T, E]
    dense.scatter_add_(1, expert_ids, weights.float())  # a repeated id adds up
    picked = torch.zeros(t, num_experts, dtype=torch.bool, device=hidden.device)  # [T, E]
    picked.scatter_(1, expert_ids, True)
    out = torch.zeros(t, hidden.shape[1], dtype=torch.float32, device=hidden.device)  # [T, D]
    for chunk in range(plan.num_chunks):
        part = slice(chunk * plan.chunk_size, (chunk + 1) * plan.chunk_size)
        chunk_ids, chunk_live = ids[part], live[part]  # [C]
        rows = fetcher.fetch_blocks(layer, chunk_ids, chunk_live, lut)  # [C, N]
        y = _every_token_through(hidden, rows, layout)  # [C, T, D]
        w = dense[:, chunk_ids].t()  # [C, T] zero where the token did not pick the expert
        # Padding rows hold anything (NaN included): `where`, not a product with zero.
        use = picked[:, chunk_ids].t() & chunk_live[:, None]  # [C, T]
        out += torch.where(use[..., None], y.float() * w[..., None], 0.0).sum(dim=0)
    return out.to(hidden.dtype)


def _every_token_through(hidden: torch.Tensor, rows: torch.Tensor,
                         layout: ExpertLayout) -> torch.Tensor:
    """Every token `hidden` `[T, D]` through each expert block of `rows` `[C, N]`: `[C, T, D]`."""
    if layout.is_fp8:
        gate_up, down = layout.dequantized_grouped(rows, hidden.dtype)
    else:
        gate_up, down = layout.grouped_views(rows)  # [C, 2I, D], [C, D, I]
    width = down.shape[2]
    x = hidden.to(gate_up.dtype).expand(rows.shape[0], *hidden.shape)  # [C, T, D]
    h = torch.bmm(x, gate_up.transpose(1, 2))  # [C, T, 2I]
    act = F.silu(h[..., :width]) * h[..., width:]  # [C, T, I]
    return torch.bmm(act, down.transpose(1, 2))  # [C, T, D]
