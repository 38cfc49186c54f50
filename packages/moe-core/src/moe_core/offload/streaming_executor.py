"""The streaming executor, for large batches: each layer's experts flow through a small ring of
slots, expert e+1 copying while expert e computes (MoE-Gen's module-based batching: every expert
crosses PCIe once per step and runs one large matrix product on all its tokens).

Dimension key: T tokens, K experts per token, D hidden, N tokens of one expert, R ring slots.

A planned resident set (say, the hottest experts, chosen by a planner for the GPU budget) keeps
its own slots for good and is never streamed. Nothing else is cached: an expert not resident is
copied every time a layer uses it, which is what large batches want (they use nearly every expert
anyway). For small batches use the on-demand executor.

Ring safety: a copy into a ring slot must not start while the previous expert in that slot may
still be computing. After the expert's kernels are enqueued, the engine's `release` records an
event on the compute stream and the next copy into the slot waits for it on the device (CUDA); on
the CPU, compute and copies are ordered anyway.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from moe_core.expert_id import ExpertId
from moe_core.offload.copy_engine import CopyEngine, CopyLane, CopyTicket
from moe_core.offload.gpu_slots import GpuSlotPool
from moe_core.offload.host_store import HostExpertStore
from moe_core.offload.stall_timer import StallTimer
from moe_core.offload.stats import OffloadStats
from moe_core.offload.token_groups import TokenGroups, expert_mlp

__all__ = ["ExpertRing", "StreamingExecutor"]


class ExpertRing:
    """The pool split into resident slots (a planned set) and a ring of streaming slots, shared
    by every layer's `StreamingExecutor` (layers run one after another).

    Attributes:
        store: Host tier.
        pool: Device slots: the first `len(resident)` hold the resident set, the next
            `ring_size` form the ring.
        engine: Copy engine.
        stats: Counters: resident uses are hits, streamed uses misses.
        stalls: Measures compute waiting for copies.
        ring_size: R.
    """

    def __init__(self, store: HostExpertStore, pool: GpuSlotPool, engine: CopyEngine,
                 stats: OffloadStats, stalls: StallTimer, resident: Iterable[ExpertId] = (),
                 ring_size: int = 2) -> None:
        """Claim the slots and start copying the resident set in (demand lane).

        Raises:
            ValueError: `ring_size` < 2, or the pool cannot hold the resident set plus the ring.
        """
        resident = list(dict.fromkeys(resident))
        if ring_size < 2:
            raise ValueError(f"ring_size must be at least 2, got {ring_size}")
        if len(resident) + ring_size > pool.num_slots:
            raise ValueError(f"the pool has {pool.num_slots} slots: too few for {len(resident)} "
                             f"resident experts plus a ring of {ring_size}")
        self.store = store
        self.pool = pool
        self.engine = engine
        self.stats = stats
        self.stalls = stalls
        self.ring_size = ring_size
        self._resident_slot = {expert: slot for slot, expert in enumerate(resident)}
        self._resident_copy: dict[ExpertId, CopyTicket] = {}
        for expert, slot in self._resident_slot.items():
            self._resident_copy[expert] = self._copy(expert, slot)
        self._ring = list(range(len(resident), len(resident) + ring_size))
        self._cursor = 0  # next ring slot to fill; carried across layers

    @property
    def resident(self) -> list[ExpertId]:
        """The planned resident set."""
        return list(self._resident_slot)

    def is_resident(self, expert: ExpertId) -> bool:
        """Whether `expert` has a permanent slot."""
        return expert in self._resident_slot

    def resident_weights(self, expert: ExpertId) -> tuple[torch.Tensor, torch.Tensor,
                                                           torch.Tensor]:
        """Slot views of a resident expert (waits for its first copy once)."""
        ticket = self._resident_copy.pop(expert, None)
        if ticket is not None:
            self.stalls.wait(self.engine, ticket)
        self.stats.hits += 1
        return self.pool.weights(self._resident_slot[expert])

    def stream(self, expert: ExpertId) -> CopyTicket:
        """Start copying `expert` into the next ring slot."""
        slot = self._ring[self._cursor]
        self._cursor = (self._cursor + 1) % self.ring_size
        self.stats.misses += 1
        return self._copy(expert, slot)

    def streamed_weights(self, ticket: CopyTicket) -> tuple[torch.Tensor, torch.Tensor,
                                                            torch.Tensor]:
        """Slot views of a streamed expert once its copy has landed."""
        self.stalls.wait(self.engine, ticket)
        return self.pool.layout.views(ticket.dst)

    def _copy(self, expert: ExpertId, slot: int) -> CopyTicket:
        ticket = self.engine.submit(self.store.block(expert), self.pool.slot(slot),
                                    CopyLane.DEMAND, key=expert)
        self.stats.bytes_copied += ticket.nbytes
        return ticket


class StreamingExecutor:
    """`ExpertExecutor` of one MoE layer that streams its experts through an `ExpertRing`.

    Attributes:
        ring: The shared ring (and resident set).
        layer: Decoder-layer index of this MoE block.
    """

    def __init__(self, ring: ExpertRing, layer: int) -> None:
        self.ring = ring
        self.layer = layer

    def __call__(self, hidden: torch.Tensor, expert_ids: torch.Tensor,
                 weights: torch.Tensor) -> torch.Tensor:
        """See `ExpertExecutor`: `hidden` `[T, D]`, ids and weights `[T, K]` -> `[T, D]`."""
        ring = self.ring
        groups = TokenGroups.build(expert_ids, weights, ring.store.num_experts, hidden.dtype)
        needed = [ExpertId(self.layer, e) for e in groups.experts()]
        streamed = [x for x in needed if not ring.is_resident(x)]
        # The first R copies go out before any compute; the resident experts compute meanwhile.
        tickets = [ring.stream(x) for x in streamed[: ring.ring_size]]
        out = torch.zeros_like(hidden)  # [T, D]
        for expert in needed:
            if ring.is_resident(expert):
                self._accumulate(out, hidden, groups, expert.expert,
                                 ring.resident_weights(expert))
        for i, expert in enumerate(streamed):
            ticket = tickets[i]
            self._accumulate(out, hidden, groups, expert.expert, ring.streamed_weights(ticket))
            ring.engine.release(ticket)  # the copy that reuses this slot waits for this compute
            if i + ring.ring_size < len(streamed):
                tickets.append(ring.stream(streamed[i + ring.ring_size]))
        return out

    @staticmethod
    def _accumulate(out: torch.Tensor, hidden: torch.Tensor, groups: TokenGroups, expert: int,
                    weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        rows = groups.rows(expert)  # [N]
        y = expert_mlp(hidden[rows], *weights)  # [N, D]
        out.index_add_(0, rows, y * groups.expert_weights(expert))
