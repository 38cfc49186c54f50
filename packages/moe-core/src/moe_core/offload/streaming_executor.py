"""The streaming executor, for large batches: each layer's experts flow through a small ring of
slots, expert e+1 copying while expert e computes (MoE-Gen's module-based batching: every expert
crosses PCIe once per step and runs one large matrix product on all its tokens).

Dimension key: T tokens, K experts per token, D hidden, N tokens of one expert (or block
elements, for copies), R ring slots, C experts of one copy.

A planned resident set (say, the hottest experts, chosen by a planner for the GPU budget) keeps
its own slots for good and is never streamed. Nothing else is cached: an expert not resident is
copied every time a layer uses it, which is what large batches want (they use nearly every expert
anyway). For small batches use the on-demand executor.

Copies run ahead of the routing. A layer cannot know which experts it needs until its router
has run, and the executor reads that back to the host (one sync per layer); with copies issued
only after it, the link idled through every layer's attention and that sync (with the per-expert
host work below, DeepSeek-V2-Lite's step took 0.81-0.94 s on the H200 against 0.53-0.62 s of
copies; decision 0005). So when a layer's call uses at least `lookahead_min_share` of its
experts (large batches use nearly all), the ring's last free slots are filled, before the call
returns, with copies of the next MoE layer's experts: those it used last time, or all of its
streamed experts the first time. They cross PCIe while that layer
attends; its call then computes the ones its routing picked and skips the rest (their bytes are
wasted, counted as prefetches issued but not used).

One copy per chunk: copies are issued in batches (every expert that fits in the ring's free
slots, at once), and each chunk of a batch, experts in consecutive rows of one layer's host arena
landing in consecutive ring slots (never wrapping round the ring's end), at most `max_group`,
crosses PCIe as one copy whose ticket all its experts share (`Flight`). A profiled
Qwen3-30B-A3B decode step at batch 512 made 1,161 copies, one per streamed expert, and the
host's per-copy work limited the step (decision 0005, 2026-12-03). The cap keeps the first run of
a layer from waiting for more than one grouped product's worth of copies.

Ring safety: a copy into a ring slot must not start while the previous expert in that slot may
still be computing. After the expert's kernels are enqueued, the engine's `release` records an
event on the compute stream and the next copy into the slot waits for it on the device (CUDA,
slot by slot even across a multi-slot copy); on the CPU, compute and copies are ordered anyway.
Slots are filled and consumed in one order. Chunks and runs need not line up (a run is cut at
`max_group` or a token gap, a chunk at a batch's end or a gap in the arena), so a chunk's ticket
is released once, after the run holding its last expert, and none of its slots is refilled
before that (`_Flights`): copy i+R reuses copy i's slot, issued only once i's whole chunk was
consumed. A chunk none of
whose experts was computed needs no release: nothing reads it, and the next copy into its slots
is queued behind it on the same stream.

Compute per layer: the tokens' inputs are gathered once in expert order; experts then run in
groups, each a run of experts in consecutive slots whose tokens are contiguous (a layer's
residents sit in consecutive slots in expert order; streamed experts land in consecutive ring
slots), one grouped matrix product per projection for the whole group (`grouped_expert_mlp`);
one scatter adds the weighted outputs back per token. Per chunk of experts, the host only submits
one copy: the host's per-expert work was what large batches of small experts (DeepSeek's, 1,400
per step) waited on.

FP8 stores (`fp8.py`): blocks cross PCIe as e4m3 weights plus their scales (half of bf16's
bytes), and each run is dequantised on the device into the activations' dtype just before its
grouped product (a workspace of at most `FP8_WORKSPACE_BYTES`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from typing import NamedTuple

import torch

from moe_core.expert_id import ExpertId
from moe_core.offload.copy_engine import CopyEngine, CopyLane, CopyTicket
from moe_core.offload.gpu_slots import GpuSlotPool
from moe_core.offload.grouped_mlp import grouped_expert_mlp
from moe_core.offload.host_store import HostExpertStore
from moe_core.offload.stall_timer import StallTimer
from moe_core.offload.stats import OffloadStats
from moe_core.offload.token_groups import TokenGroups

__all__ = ["FP8_WORKSPACE_BYTES", "ExpertRing", "Flight", "StreamingExecutor"]

# FP8 experts are dequantised a run at a time on the device: a run holds at most this many bytes
# of 16-bit weights (at least one expert), which a planner counts as workspace.
FP8_WORKSPACE_BYTES = 256 * 2**20


class Flight(NamedTuple):
    """An expert copied into the ring: which expert, the ticket of its copy (shared by every
    expert of its chunk), and the ring slot it fills."""

    expert: ExpertId
    ticket: CopyTicket
    slot: int


class ExpertRing:
    """The pool split into resident slots (a planned set) and a ring of streaming slots, shared
    by every layer's `StreamingExecutor` (layers run one after another).

    Attributes:
        store: Host tier.
        pool: Device slots: the first `len(resident)` hold the resident set (each layer's in
            consecutive slots, in expert order), the next `ring_size` form the ring.
        engine: Copy engine.
        stats: Counters: resident uses are hits, streamed uses misses; copies issued ahead of a
            layer's routing count as prefetches (issued, and used when its routing wanted them).
        stalls: Measures compute waiting for copies.
        ring_size: R.
        lookahead_min_share: Copy the next layer's experts ahead of its routing when the current
            layer used at least this share of its experts (None: never).
        max_group: Most experts computed by one grouped product, and copied by one copy.
    """

    def __init__(self, store: HostExpertStore, pool: GpuSlotPool, engine: CopyEngine,
                 stats: OffloadStats, stalls: StallTimer, resident: Iterable[ExpertId] = (),
                 ring_size: int = 2, lookahead_min_share: float | None = 0.5,
                 max_group: int = 8) -> None:
        """Claim the slots and start copying the resident set in (demand lane).

        Raises:
            ValueError: `ring_size` < 2, the pool cannot hold the resident set plus the ring,
                `lookahead_min_share` outside [0, 1], or `max_group` < 1.
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
        if max_group < 1:
            raise ValueError(f"max_group must be at least 1, got {max_group}")
        self.store = store
        self.pool = pool
        self.engine = engine
        self.stats = stats
        self.stalls = stalls
        self.ring_size = ring_size
        self.lookahead_min_share = lookahead_min_share
        self.max_group = max_group
        self._resident = resident
        ordered = sorted(resident)
        self._resident_slot = {expert: slot for slot, expert in enumerate(ordered)}
        self._resident_copy = {f.expert: f.ticket
                               for f in self._submit(ordered, range(len(ordered)))}
        self._layer_residents: dict[int, list[ExpertId]] = {}
        for expert in ordered:
            self._layer_residents.setdefault(expert.layer, []).append(expert)
        self._ring = list(range(len(resident), len(resident) + ring_size))
        self._cursor = 0  # next ring slot to fill; carried across layers
        layers = store.moe_layers
        self._next_layer = {layer: layers[(i + 1) % len(layers)] for i, layer in enumerate(layers)}
        # Streamed (non-resident) experts of each layer, and those its last call used.
        self._streamable = {layer: [ExpertId(layer, e) for e in range(store.num_experts)
                                    if ExpertId(layer, e) not in self._resident_slot]
                            for layer in layers}
        self._last_used: dict[int, list[ExpertId]] = {}
        self._ahead: deque[Flight] = deque()  # issued for the next layer, before its routing
        self._guesses: Iterator[ExpertId] = iter(())  # the next layer's, still to issue

    @property
    def resident(self) -> list[ExpertId]:
        """The planned resident set."""
        return list(self._resident)

    def is_resident(self, expert: ExpertId) -> bool:
        """Whether `expert` has a permanent slot."""
        return expert in self._resident_slot

    def residents_of(self, layer: int) -> list[ExpertId]:
        """`layer`'s resident experts in expert order (their slots are consecutive)."""
        return self._layer_residents.get(layer, [])

    def resident_slot(self, expert: ExpertId) -> int:
        """The permanent slot of a resident expert (waits for its first copy once)."""
        ticket = self._resident_copy.pop(expert, None)
        if ticket is not None:
            self.stalls.wait(self.engine, ticket)
        return self._resident_slot[expert]

    def next_slots(self, count: int) -> list[int]:
        """The ring slots the next `count` experts `stream`ed will fill, in order."""
        return [self._ring[(self._cursor + i) % self.ring_size] for i in range(count)]

    def stream(self, experts: Sequence[ExpertId]) -> list[Flight]:
        """Start copying `experts` into the next ring slots, one copy per chunk (`_chunks`).

        The caller fills only slots whose earlier copies' chunks it has consumed (at most
        `ring_size` slots held), and consumes the flights in the order issued.

        Raises:
            ValueError: more experts than the ring has slots.
        """
        if len(experts) > self.ring_size:
            raise ValueError(f"{len(experts)} experts do not fit a ring of {self.ring_size}")
        slots = self.next_slots(len(experts))
        self._cursor = (self._cursor + len(experts)) % self.ring_size
        return self._submit(experts, slots)

    def take_ahead(self) -> list[Flight]:
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

    def top_up(self, held: int) -> None:
        """Fill the ring's free slots (the current call's own copies hold `held`) with copies of
        the next layer's likely experts, in order, all at once."""
        free = self.ring_size - held - len(self._ahead)
        guesses = list(islice(self._guesses, max(free, 0)))
        self._ahead.extend(self.stream(guesses))
        self.stats.prefetches_issued += len(guesses)

    def _submit(self, experts: Sequence[ExpertId], slots: Sequence[int]) -> list[Flight]:
        """Copy `experts` into `slots`, one copy per chunk; a flight per expert."""
        flights: list[Flight] = []
        for chunk in self._chunks(experts, slots):
            ticket = self._copy(experts[chunk], slots[chunk.start])
            flights += [Flight(x, ticket, slot)
                        for x, slot in zip(experts[chunk], slots[chunk], strict=True)]
        return flights

    def _chunks(self, experts: Sequence[ExpertId], slots: Sequence[int]) -> Iterator[slice]:
        """`experts` (filling `slots`) cut into chunks that one copy moves: consecutive rows of
        one layer's arena (`HostExpertStore.row`; a shard's rows skip what it lacks) into
        consecutive slots, at most `max_group`."""
        rows = [self.store.row(x) for x in experts]
        start = 0
        for i in range(1, len(experts) + 1):
            if (i < len(experts) and experts[i].layer == experts[i - 1].layer
                    and rows[i] == rows[i - 1] + 1 and slots[i] == slots[i - 1] + 1
                    and i - start < self.max_group):
                continue
            yield slice(start, i)
            start = i

    def _copy(self, experts: Sequence[ExpertId], first_slot: int) -> CopyTicket:
        """One copy of `experts` (consecutive rows of one layer's arena) into consecutive slots
        from `first_slot`."""
        count = len(experts)
        src = self.store.rows(experts[0].layer, self.store.row(experts[0]), count)  # [C, N]
        ticket = self.engine.submit(src, self.pool.rows(first_slot, count),  # [C, N]
                                    CopyLane.DEMAND, key=tuple(experts))
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
        wanted = set(streamed)
        # This call's copies, in the order they fill the ring: those issued ahead (for this
        # layer, if the ring guessed right), then the rest of the layer's streamed experts.
        ahead = ring.take_ahead()
        ring.begin(self.layer, needed)
        ring.stats.prefetches_used += sum(f.expert in wanted for f in ahead)
        early = {f.expert for f in ahead}
        later = [x for x in streamed if x not in early]
        slots = [f.slot for f in ahead] + ring.next_slots(len(later))
        order = [f.expert for f in ahead] + later
        runs = self._runs(order, slots, groups)
        residents = self._runs(ring.residents_of(self.layer),
                               [ring.resident_slot(x) for x in ring.residents_of(self.layer)],
                               groups)
        computed = [run for run in runs + residents if run.tokens]
        offsets = dict(zip(map(id, computed), groups.group_offsets(
            [[x.expert for x in run.experts] for run in computed]), strict=True))
        layout = ring.pool.layout
        # FP8 blocks are dequantised to the activations' dtype: the products run in it.
        xs = groups.sorted_inputs(hidden, hidden.dtype if layout.is_fp8 else layout.dtype)
        ys = torch.empty_like(xs)  # [T*K, D], every row written below
        flights = _Flights(ahead)
        issued = iter(later)

        def issue() -> None:  # fill every free slot at once: few, long copies, in order
            free = ring.ring_size - flights.held
            batch = list(islice(issued, free))
            flights.add(ring.stream(batch))
            if len(batch) < free:
                ring.top_up(flights.held)

        issue()
        lands_first = any(x in wanted for x in early)
        if not lands_first:  # nothing landed yet: the residents compute while copies land
            self._compute(residents, xs, ys, groups, offsets)
        for run in runs:
            taken = flights.take(len(run.experts))
            if run.tokens:
                ring.stalls.wait_all(ring.engine, list(dict.fromkeys(f.ticket for f in taken)))
                ring.stats.misses += sum(x in wanted for x in run.experts)
                self._compute([run], xs, ys, groups, offsets)
            done = flights.consume(taken, computed=run.tokens > 0)
            if done:
                ring.engine.release(*done)  # copies reusing these slots wait for this
            issue()
        if lands_first:
            self._compute(residents, xs, ys, groups, offsets)
        return groups.combine(ys, hidden)

    def _runs(self, experts: list[ExpertId], slots: list[int], groups: TokenGroups
              ) -> list[_Run]:
        """`experts` (in slot order) cut into runs computed by one grouped product each: same
        layer as this call, consecutive slots, tokens contiguous in the sorted order, at most
        `max_group`. Experts of another layer (a wrong guess) form runs of no tokens."""
        runs: list[_Run] = []
        longest = self.ring.max_group
        layout = self.ring.pool.layout
        if layout.is_fp8:  # a run is dequantised whole: bound that workspace
            wide = 3 * layout.hidden_size * layout.intermediate_size * 2
            longest = max(1, min(longest, FP8_WORKSPACE_BYTES // wide))
        for expert, slot in zip(experts, slots, strict=True):
            own = expert.layer == self.layer
            span = groups.span(expert.expert) if own else slice(0, 0)
            last = runs[-1] if runs else None
            if (last is not None and own and last.own and slot == last.first_slot + len(
                    last.experts) and span.start == last.stop and len(last.experts)
                    < longest):
                last.experts.append(expert)
                last.stop = span.stop
            else:
                runs.append(_Run([expert], slot, span.start, span.stop, own))
        return runs

    def _compute(self, runs: list[_Run], xs: torch.Tensor, ys: torch.Tensor,
                 groups: TokenGroups, offsets: dict[int, torch.Tensor]) -> None:
        ring = self.ring
        for run in runs:
            if not run.tokens:
                continue
            if ring.is_resident(run.experts[0]):
                ring.stats.hits += sum(groups.counts[x.expert] > 0 for x in run.experts)
            layout = ring.pool.layout
            rows_of_run = ring.pool.rows(run.first_slot, len(run.experts))
            gate_up, down = (layout.dequantized_grouped(rows_of_run, xs.dtype) if layout.is_fp8
                             else layout.grouped_views(rows_of_run))
            rows = slice(run.start, run.stop)
            grouped_expert_mlp(xs[rows], gate_up, down,
                               [groups.counts[x.expert] for x in run.experts],
                               offsets[id(run)], ys[rows])


class _Run:
    """Experts in consecutive slots whose tokens are contiguous in the sorted order."""

    __slots__ = ("experts", "first_slot", "own", "start", "stop")

    def __init__(self, experts: list[ExpertId], first_slot: int, start: int, stop: int,
                 own: bool) -> None:
        self.experts = experts
        self.first_slot = first_slot
        self.start = start  # first sorted assignment
        self.stop = stop
        self.own = own  # of the calling layer (else a wrong guess: skipped)

    @property
    def tokens(self) -> int:
        """Assignments the run computes."""
        return self.stop - self.start if self.own else 0


class _Flights:
    """One call's copies in the order they fill the ring: how many are consumed, and which
    chunks' slots may be refilled.

    A chunk may span several runs, so its ticket is released once, when its last expert is
    consumed (and only if one of its experts was computed: the release then covers every
    read of its slots), and its slots are held until then.
    """

    def __init__(self, ahead: list[Flight]) -> None:
        self.flights = list(ahead)
        self.consumed = 0
        self.freed = 0  # leading flights whose whole chunk is consumed
        self._read: set[CopyTicket] = set()  # tickets of computed experts, not yet released

    @property
    def held(self) -> int:
        """Ring slots this call holds: copies issued whose chunk is not wholly consumed."""
        return len(self.flights) - self.freed

    def add(self, flights: list[Flight]) -> None:
        """Copies just issued, in ring order."""
        self.flights += flights

    def take(self, count: int) -> list[Flight]:
        """The next `count` copies to consume, in order (a run's; all issued already, since a
        run and the part of a chunk consumed before it share `ring_size` slots)."""
        taken = self.flights[self.consumed : self.consumed + count]
        assert len(taken) == count, "a run's copies were not all issued"
        return taken

    def consume(self, taken: list[Flight], computed: bool) -> list[CopyTicket]:
        """Mark `taken` consumed (`computed`, or skipped); return the tickets to release now:
        those of the chunks it completes that had an expert computed, each once."""
        self.consumed += len(taken)
        if computed:
            self._read.update(f.ticket for f in taken)
        end = self.consumed
        if end < len(self.flights):  # the chunk of the last one consumed may go on: hold it
            going_on = self.flights[end].ticket
            while end > self.freed and self.flights[end - 1].ticket is going_on:
                end -= 1
        done = [t for t in dict.fromkeys(f.ticket for f in self.flights[self.freed : end])
                if t in self._read]
        self._read.difference_update(done)
        self.freed = end
        return done
