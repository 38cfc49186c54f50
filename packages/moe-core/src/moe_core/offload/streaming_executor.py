"""The streaming executor, for large batches: each layer's experts flow through a small ring of
slots, expert e+1 copying while expert e computes (MoE-Gen's module-based batching: every expert
crosses PCIe once per step and runs one large matrix product on all its tokens).

Dimension key: T tokens, K experts per token, D hidden, N tokens of one expert, R ring slots.

A planned resident set (say, the hottest experts, chosen by a planner for the GPU budget) keeps
its own slots for good and is never streamed. Nothing else is cached: an expert not resident is
copied every time a layer uses it, which is what large batches want (they use nearly every expert
anyway). For small batches use the on-demand executor.

Copies run ahead of the routing. A layer cannot know which experts it needs until its router
has run, and the executor reads that back to the host (one sync per layer); with copies issued
only after it, the link idled through every layer's attention and that sync (DeepSeek-V2-Lite on
the H200: a 810 ms step against 533 ms of copies). So when a layer's call finds most of its
streamed experts used (`lookahead_min_share`, large batches use nearly all), the ring's last free
slots are filled, before the call returns, with copies of the next MoE layer's experts: those it
used last time, or all of its streamed experts the first time. They cross PCIe while that layer
attends; its call then computes the ones its routing picked and skips the rest (their bytes are
wasted, counted as prefetches issued but not used).

Ring safety: a copy into a ring slot must not start while the previous expert in that slot may
still be computing. After the expert's kernels are enqueued, the engine's `release` records an
event on the compute stream and the next copy into the slot waits for it on the device (CUDA); on
the CPU, compute and copies are ordered anyway. Slots are filled and consumed in one order (copy
i+R reuses copy i's slot, issued only once i was consumed), and a skipped copy needs no release:
nothing reads it, and the next copy into its slot is queued behind it on the same stream.

Compute per layer: the tokens' inputs are gathered once in expert order, each expert runs four
kernels on its contiguous span (gate and up as one product) writing its outputs in place, and one
scatter adds the weighted outputs back per token; the host work per expert is what large batches
of small experts (DeepSeek's, 1,400 per step) wait on.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator

import torch

from moe_core.expert_id import ExpertId
from moe_core.offload.copy_engine import CopyEngine, CopyLane, CopyTicket
from moe_core.offload.gpu_slots import GpuSlotPool
from moe_core.offload.host_store import HostExpertStore
from moe_core.offload.stall_timer import StallTimer
from moe_core.offload.stats import OffloadStats
from moe_core.offload.token_groups import TokenGroups, expert_mlp_into

__all__ = ["ExpertRing", "StreamingExecutor"]


class ExpertRing:
    """The pool split into resident slots (a planned set) and a ring of streaming slots, shared
    by every layer's `StreamingExecutor` (layers run one after another).

    Attributes:
        store: Host tier.
        pool: Device slots: the first `len(resident)` hold the resident set, the next
            `ring_size` form the ring.
        engine: Copy engine.
        stats: Counters: resident uses are hits, streamed uses misses; copies issued ahead of a
            layer's routing count as prefetches (issued, and used when its routing wanted them).
        stalls: Measures compute waiting for copies.
        ring_size: R.
        lookahead_min_share: Copy the next layer's experts ahead of its routing when at least
            this share of the current layer's streamed experts was used (None: never).
    """

    def __init__(self, store: HostExpertStore, pool: GpuSlotPool, engine: CopyEngine,
                 stats: OffloadStats, stalls: StallTimer, resident: Iterable[ExpertId] = (),
                 ring_size: int = 2, lookahead_min_share: float | None = 0.5) -> None:
        """Claim the slots and start copying the resident set in (demand lane).

        Raises:
            ValueError: `ring_size` < 2, the pool cannot hold the resident set plus the ring, or
                `lookahead_min_share` outside [0, 1].
        """
        resident = list(dict.fromkeys(resident))
        if ring_size < 2:
            raise ValueError(f"ring_size must be at least 2, got {ring_size}")
        if len(resident) + ring_size > pool.num_slots:
            raise ValueError(f"the pool has {pool.num_slots} slots: too few for {len(resident)} "
                             f"resident experts plus a ring of {ring_size}")
        if lookahead_min_share is not None and not 0.0 <= lookahead_min_share <= 1.0:
            raise ValueError(f"lookahead_min_share must be in [0, 1] or None, got "
                             f"{lookahead_min_share}")
        self.store = store
        self.pool = pool
        self.engine = engine
        self.stats = stats
        self.stalls = stalls
        self.ring_size = ring_size
        self.lookahead_min_share = lookahead_min_share
        self._resident_slot = {expert: slot for slot, expert in enumerate(resident)}
        self._resident_copy: dict[ExpertId, CopyTicket] = {}
        for expert, slot in self._resident_slot.items():
            self._resident_copy[expert] = self._copy(expert, slot)
        self._ring = list(range(len(resident), len(resident) + ring_size))
        self._cursor = 0  # next ring slot to fill; carried across layers
        layers = store.moe_layers
        self._next_layer = {layer: layers[(i + 1) % len(layers)] for i, layer in enumerate(layers)}
        # Streamed (non-resident) experts of each layer, and those its last call used.
        self._streamable = {layer: [ExpertId(layer, e) for e in range(store.num_experts)
                                    if ExpertId(layer, e) not in self._resident_slot]
                            for layer in layers}
        self._last_used: dict[int, list[ExpertId]] = {}
        self._ahead: deque[tuple[ExpertId, CopyTicket]] = deque()  # issued for the next layer
        self._guesses: Iterator[ExpertId] = iter(())  # the next layer's, still to issue

    @property
    def resident(self) -> list[ExpertId]:
        """The planned resident set."""
        return list(self._resident_slot)

    def is_resident(self, expert: ExpertId) -> bool:
        """Whether `expert` has a permanent slot."""
        return expert in self._resident_slot

    def resident_block(self, expert: ExpertId) -> torch.Tensor:
        """The slot of a resident expert (waits for its first copy once)."""
        ticket = self._resident_copy.pop(expert, None)
        if ticket is not None:
            self.stalls.wait(self.engine, ticket)
        self.stats.hits += 1
        return self.pool.slot(self._resident_slot[expert])

    def resident_weights(self, expert: ExpertId) -> tuple[torch.Tensor, torch.Tensor,
                                                           torch.Tensor]:
        """Slot views of a resident expert (waits for its first copy once)."""
        return self.pool.layout.views(self.resident_block(expert))

    def stream(self, expert: ExpertId) -> CopyTicket:
        """Start copying `expert` into the next ring slot (the caller keeps at most `ring_size`
        copies unconsumed, consumed in the order issued)."""
        slot = self._ring[self._cursor]
        self._cursor = (self._cursor + 1) % self.ring_size
        return self._copy(expert, slot)

    def streamed_block(self, ticket: CopyTicket) -> torch.Tensor:
        """The ring slot of a streamed expert once its copy has landed (counts a miss)."""
        self.stalls.wait(self.engine, ticket)
        self.stats.misses += 1
        return ticket.dst

    def streamed_weights(self, ticket: CopyTicket) -> tuple[torch.Tensor, torch.Tensor,
                                                            torch.Tensor]:
        """Slot views of a streamed expert once its copy has landed."""
        return self.pool.layout.views(self.streamed_block(ticket))

    def take_ahead(self) -> list[tuple[ExpertId, CopyTicket]]:
        """The copies issued ahead of the coming call, oldest first (the caller consumes them
        first, in this order)."""
        ahead = list(self._ahead)
        self._ahead.clear()
        return ahead

    def begin(self, layer: int, needed: list[ExpertId]) -> None:
        """`layer`'s routing is known and it uses `needed` (resident or not): remember its
        streamed ones for its next call and, if it used at least `lookahead_min_share` of its
        experts (a large batch), let `top_up` copy the next layer's likely experts."""
        used = [x for x in needed if x not in self._resident_slot]
        self._last_used[layer] = used
        share = self.lookahead_min_share
        if share is None or len(needed) < share * self.store.num_experts:
            self._guesses = iter(())
            return
        nxt = self._next_layer[layer]
        self._guesses = iter(self._last_used.get(nxt, self._streamable[nxt]))

    def top_up(self, unconsumed: int) -> None:
        """Fill the ring's free slots (`unconsumed` of the current call's own copies hold the
        others) with copies of the next layer's likely experts, in order."""
        while unconsumed + len(self._ahead) < self.ring_size:
            expert = next(self._guesses, None)
            if expert is None:
                return
            self._ahead.append((expert, self.stream(expert)))
            self.stats.prefetches_issued += 1

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
        ring, layout = self.ring, self.ring.pool.layout
        groups = TokenGroups.build(expert_ids, weights, ring.store.num_experts, hidden.dtype)
        needed = [ExpertId(self.layer, e) for e in groups.experts()]
        streamed = [x for x in needed if not ring.is_resident(x)]
        wanted = set(streamed)
        # Copies issued ahead (for this layer, if the ring guessed right) come first, in order;
        # the rest of this layer's experts follow, at most `ring_size` copies unconsumed.
        pending = deque(ring.take_ahead())
        ring.begin(self.layer, needed)
        early = {x for x, _ in pending}
        for x, _ in pending:
            if x in wanted:
                ring.stats.prefetches_used += 1
        later = deque(x for x in streamed if x not in early)
        while later and len(pending) < ring.ring_size:
            x = later.popleft()
            pending.append((x, ring.stream(x)))
        xs = groups.sorted_inputs(hidden, layout.dtype)  # [T*K, D]
        ys = torch.empty_like(xs)  # [T*K, D], every row written below
        residents = [x for x in needed if ring.is_resident(x)]
        ahead = any(x in wanted for x in early)
        if not ahead:  # nothing landed yet: the residents compute while the first copies land
            self._compute_residents(residents, xs, ys, groups)
        while pending:
            expert, ticket = pending.popleft()
            if expert in wanted:
                span = groups.span(expert.expert)
                gate_up, down = layout.gate_up_down(ring.streamed_block(ticket))
                expert_mlp_into(xs[span], gate_up, down, ys[span])
                ring.engine.release(ticket)  # the copy that reuses this slot waits for this
            if later:
                x = later.popleft()
                pending.append((x, ring.stream(x)))
            else:
                ring.top_up(len(pending))
        ring.top_up(0)
        if ahead:
            self._compute_residents(residents, xs, ys, groups)
        return groups.combine(ys, hidden)

    def _compute_residents(self, residents: list[ExpertId], xs: torch.Tensor, ys: torch.Tensor,
                           groups: TokenGroups) -> None:
        layout = self.ring.pool.layout
        for expert in residents:
            span = groups.span(expert.expert)
            gate_up, down = layout.gate_up_down(self.ring.resident_block(expert))
            expert_mlp_into(xs[span], gate_up, down, ys[span])
