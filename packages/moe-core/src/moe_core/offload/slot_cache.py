"""The GPU expert cache shared by every layer: residency table + slot pool + copy engine.

It turns the residency table's decisions into copies and keeps the bookkeeping that spans layers:
the copy ticket of each expert in flight, the prefetches not yet used, the last copy into each
slot (so a slot is not overwritten while kernels still read it), and the counters.

Slot reuse on CUDA: after the kernels reading a slot are enqueued, `release` calls the engine's
`release(ticket)` on the copy that filled the slot, which records an event on the compute stream;
the next copy into that slot waits for it on the device. A prefetch that could no longer be
cancelled (already on a copy stream) is awaited the same way before its slot may be reused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import torch

from moe_core.expert_id import ExpertId
from moe_core.offload.copy_engine import CopyEngine, CopyLane, CopyTicket
from moe_core.offload.cpu_lane import CpuLane, CpuLaneCounts
from moe_core.offload.gpu_slots import GpuSlotPool
from moe_core.offload.graph_use_log import GraphUseLog
from moe_core.offload.host_store import HostExpertStore
from moe_core.offload.prefetch_counts import PrefetchCounts
from moe_core.offload.residency import Residency, ResidencyTable
from moe_core.offload.stall_timer import StallTimer
from moe_core.offload.stats import OffloadStats

if TYPE_CHECKING:
    from moe_core.offload.prefetcher import Prefetcher

__all__ = ["ExpertSlotCache", "LayerMap"]

_FLUSH_AFTER = 4096
"""Device-routed uses kept before they are counted (one host read per entry)."""


@dataclass(eq=False)
class LayerMap:
    """One layer's expert -> slot table at one version of the cache.

    Attributes:
        version: The layer's slot-change count it was built at.
        host: `[E]` slot of each expert, -1 where absent or in flight (host list).
        complete: Every expert of the layer is resident and ready.
        table: The layer's one device table `[E]` (the same tensor for every version, so a
            captured step that reads it sees each later version).
    """

    version: int
    host: list[int]
    complete: bool
    table: torch.Tensor

    @cached_property
    def resident(self) -> int:
        """Experts of the layer resident and ready."""
        return sum(1 for s in self.host if s >= 0)

    @cached_property
    def slots(self) -> torch.Tensor:
        """The device table, filled with this version on first use (the copy path never needs
        it for a layer that is not complete, and its slots change on every call). The copy is
        ordered on the current stream after every earlier read of the table."""
        self.table.copy_(torch.tensor(self.host, dtype=torch.long))
        return self.table


class ExpertSlotCache:
    """Experts of every layer cached in the slots of one pool, fetched on demand or prefetched.

    Usage per layer call: `acquire` the experts needed (demand copies for the misses go out at
    once), then for each: `weights` (waits for that expert's copy only), compute, `release`.

    Attributes:
        store: Host tier (source of every copy).
        pool: Device slots.
        engine: Copy engine.
        table: Which expert is in which slot; shared with whoever plugs in a policy.
        stats: Counters (shared by every layer).
        stalls: Measures compute waiting for copies.
        prefetch_counts: Prefetches issued, used and wasted per layer.
        prefetcher: Asked before every replayed (graph-captured) step what to prefetch for it
            (`Prefetcher.between_steps`); None: nothing.
    """

    def __init__(self, store: HostExpertStore, pool: GpuSlotPool, engine: CopyEngine,
                 table: ResidencyTable, stats: OffloadStats, stalls: StallTimer) -> None:
        if table.num_slots != pool.num_slots:
            raise ValueError(f"residency table has {table.num_slots} slots, pool "
                             f"{pool.num_slots}")
        if store.layout != pool.layout:
            raise ValueError(f"store layout {store.layout} differs from pool layout {pool.layout}")
        self.store = store
        self.pool = pool
        self.engine = engine
        self.table = table
        self.stats = stats
        self.stalls = stalls
        self._in_flight: dict[ExpertId, CopyTicket] = {}  # copies not yet awaited
        self._prefetched: set[ExpertId] = set()  # prefetched, not yet used
        self._filled_by: dict[int, CopyTicket] = {}  # slot -> last copy into it
        self._version: dict[int, int] = {}  # layer -> count of slot changes in that layer
        self._maps: dict[int, LayerMap] = {}  # layer -> its device slot table
        self._deferred: list[tuple[int, torch.Tensor, LayerMap]] = []  # uses not yet counted
        self._map_read_layers: set[int] = set()  # layers whose slots were read via a LayerMap
        self._tables: dict[int, torch.Tensor] = {}  # layer -> its device table [E]
        self._graph_log = GraphUseLog(pool.device)
        self._graph_maps: dict[int, LayerMap] = {}  # layer -> the map replays read through
        self._warming_up = False  # between before_warmup and after_warmup
        self.cpu_lane: CpuLane | None = None  # two-lane decode's CPU lane, counted at flushes
        # told every count taken from the CPU lane (two-lane decode re-fits its rates on them)
        self.on_cpu_lane_counts: Callable[[CpuLaneCounts], None] | None = None
        self.prefetch_counts = PrefetchCounts()
        self.prefetcher: Prefetcher | None = None

    # Demand path ----------------------------------------------------------------------------

    def acquire(self, experts: Iterable[ExpertId]) -> list[ExpertId]:
        """Pin `experts` in slots and submit demand copies for the misses, all before any
        compute, so copies overlap the compute of the experts already there.

        Returns:
            The same experts in the order to compute them: ready ones first, then those
            already on their way (prefetched), then the misses in submission order.

        Raises:
            RuntimeError: no slot can be freed (see `capacity`).
        """
        self.flush_deferred()  # eviction decisions need every earlier use counted
        ready: list[ExpertId] = []
        coming: list[ExpertId] = []
        fetched: list[ExpertId] = []
        for expert in experts:
            grant = self.table.acquire(expert)
            if grant.evicted is not None:
                self._on_evict(grant.evicted)
            if grant.needs_copy:
                self.stats.misses += 1
                self._submit(expert, grant.slot, CopyLane.DEMAND)
                fetched.append(expert)
                continue
            self.stats.hits += 1
            if expert in self._prefetched:
                self._prefetched.discard(expert)
                self.stats.prefetches_used += 1
                self.prefetch_counts.of(expert.layer).used += 1
            (coming if expert in self._in_flight else ready).append(expert)
        return ready + coming + fetched

    def weights(self, expert: ExpertId, dtype: torch.dtype | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(gate, up, down)` slot views of an acquired expert, once its copy has landed (on
        CUDA: once the compute stream has been told to wait for it); of an FP8 pool, dequantised
        to `dtype` (`GpuSlotPool.weights`)."""
        ticket = self._in_flight.pop(expert, None)
        if ticket is not None:
            self.stalls.wait(self.engine, ticket)
            self._mark_ready(expert)
        slot = self.table.slot_of(expert)
        if slot is None:
            raise RuntimeError(f"{expert} holds no slot; acquire it first")
        return self.pool.weights(slot, dtype)

    def ready_slots(self, experts: list[ExpertId]) -> list[int]:
        """The slots of acquired `experts`, once all their copies have landed (on CUDA: once
        the compute stream has been told to wait for them), timed as one stall."""
        tickets = [self._in_flight.pop(e) for e in experts if e in self._in_flight]
        self.stalls.wait_all(self.engine, tickets)
        for ticket in tickets:
            assert isinstance(ticket.key, ExpertId)
            self._mark_ready(ticket.key)
        slots = [self.table.slot_of(e) for e in experts]
        if any(slot is None for slot in slots):
            raise RuntimeError(f"{experts} include experts holding no slot; acquire them first")
        return slots  # type: ignore[return-value]

    def release(self, *experts: ExpertId) -> None:
        """Unpin `experts` after their compute has been issued, fencing their slots (one event)
        for the next copies."""
        fills = []
        for expert in experts:
            slot = self.table.slot_of(expert)
            if slot is not None and slot in self._filled_by:
                fills.append(self._filled_by[slot])
        self.engine.release(*fills)
        for expert in experts:
            self.table.release(expert)

    def capacity(self) -> int:
        """Slots an `acquire` may still claim when nothing is pinned: all but those held by
        prefetches in flight (in-flight experts are never evicted)."""
        return self.table.num_slots - sum(1 for e in self._in_flight if e in self._prefetched)

    def is_absent(self, expert: ExpertId) -> bool:
        """Whether `expert` holds no slot (neither ready nor on its way)."""
        return self.table.state(expert) is Residency.ABSENT

    def absent_experts(self) -> list[int]:
        """Per MoE layer of the store (in order), its experts holding no slot (what two-lane
        decode expects its calls to miss, `TwoLanes`)."""
        return [sum(self.is_absent(ExpertId(layer, e)) for e in range(self.store.num_experts))
                for layer in self.store.moe_layers]

    # Device-side routing ----------------------------------------------------------------------

    def layer_map(self, layer: int) -> LayerMap:
        """Where each expert of `layer` sits, as a device table a layer can index with its
        routing without reading it on the host (`[E]` slot, -1 where the expert is absent or
        still in flight). Rebuilt only after the layer's slots changed."""
        version = self._version.get(layer, 0)
        cached = self._maps.get(layer)
        if cached is not None and cached.version == version:
            return cached
        host: list[int] = []
        for e in range(self.store.num_experts):
            expert = ExpertId(layer, e)
            ready = self.table.state(expert) is Residency.READY and expert not in self._in_flight
            slot = self.table.slot_of(expert) if ready else None
            host.append(-1 if slot is None else slot)
        table = self._tables.get(layer)
        if table is None:
            table = self._tables[layer] = torch.full((self.store.num_experts,), -1,
                                                     dtype=torch.long, device=self.pool.device)
        layer_map = LayerMap(version, host, all(s >= 0 for s in host), table)
        self._maps[layer] = layer_map
        return layer_map

    def use_layer_map(self, layer_map: LayerMap, layer: int, expert_ids: torch.Tensor) -> None:
        """After a layer's compute over `layer_map` was enqueued: count the uses later, when the
        routing is next read on the host anyway (`flush_deferred`): resident experts as hits,
        the others as misses read from host memory by the GPU (`mapped_bytes`).

        No per-slot fence is recorded (that was an event and 128 dictionary writes per layer):
        instead, evicting an expert of a layer read this way fences the next copies behind all
        compute issued so far (`_on_evict`), which includes every read of that slot.
        """
        self._map_read_layers.add(layer)
        self._deferred.append((layer, expert_ids, layer_map))
        if self._warming_up:  # a capture of this call follows: its use log must exist first
            self._graph_log.allocate(layer, expert_ids)
        if len(self._deferred) >= _FLUSH_AFTER:  # bounded memory on long runs
            self.flush_deferred()

    def flush_deferred(self) -> None:
        """Count the device-routed uses: hits (and accesses for the policy), mapped misses;
        those of replayed graph steps too."""
        for layer, used in self._graph_log.drain(sorted(self._graph_maps)):
            self._count_uses(layer, used, self._graph_maps[layer])
        if self._deferred:
            deferred, self._deferred = self._deferred, []
            flat = torch.cat([ids.reshape(-1) for _, ids, _ in deferred]).tolist()  # host read
            start = 0
            for layer, ids, layer_map in deferred:
                used, start = flat[start : start + ids.numel()], start + ids.numel()
                self._count_uses(layer, used, layer_map)
        if self.cpu_lane is not None:
            self._count_cpu_lane(self.cpu_lane)

    def _count_cpu_lane(self, lane: CpuLane) -> None:
        """Move the CPU lane's uses from misses to CPU computations. They were counted as mapped
        misses above (absent from the map they were routed through); every one of them ran
        before the host read that counted them, so the lane's counts match."""
        counts = lane.take_counts()
        if self.on_cpu_lane_counts is not None:
            self.on_cpu_lane_counts(counts)
        self.stats.misses -= counts.experts
        self.stats.bytes_copied -= counts.bytes
        self.stats.mapped_bytes -= counts.bytes
        self.stats.cpu_experts += counts.experts
        self.stats.cpu_tokens += counts.tokens
        self.stats.cpu_bytes += counts.bytes
        self.stats.cpu_seconds += counts.seconds

    def _count_uses(self, layer: int, used: list[int], layer_map: LayerMap) -> None:
        """One call's uses of `layer`'s experts, read through `layer_map`."""
        nbytes = self.store.layout.nbytes
        for e in sorted(set(used)):
            expert = ExpertId(layer, e)
            if layer_map.host[e] < 0:
                self.stats.misses += 1
                self.stats.bytes_copied += nbytes
                self.stats.mapped_bytes += nbytes
                continue
            self.stats.hits += 1
            if self.table.slot_of(expert) is not None:  # not evicted since
                self.table.touch(expert)
            if expert in self._prefetched:
                self._prefetched.discard(expert)
                self.stats.prefetches_used += 1
                self.prefetch_counts.of(expert.layer).used += 1

    # Graph-captured steps (the `GraphHooks` of decode_runner) -------------------------------

    def log_graph_use(self, layer: int, expert_ids: torch.Tensor) -> LayerMap:
        """Inside a capture: the layer's map for the captured read, and its routing logged on
        the device for `flush_deferred` (see `GraphUseLog`)."""
        layer_map = self.layer_map(layer)
        self._map_read_layers.add(layer)
        self._graph_maps[layer] = layer_map
        self._graph_log.record(layer, expert_ids)
        return layer_map

    def before_replay(self) -> None:
        """Bring every captured layer's device table to the cache's current state, counting the
        logged uses first whenever a table changes (they were read through the old one)."""
        self.settle()
        if self.prefetcher is not None:  # the next token's guesses, while no layer runs
            experts = self.prefetcher.between_steps(self)
            if experts:
                self.prefetch(experts)
        changed = [layer for layer, seen in self._graph_maps.items()
                   if self._version.get(layer, 0) != seen.version]
        if changed:
            self.flush_deferred()
        for layer in changed:
            layer_map = self._graph_maps[layer] = self.layer_map(layer)
            layer_map.slots  # noqa: B018 (fills the table the graph reads)

    def after_replay(self, num_tokens: int) -> None:
        """Advance the use log; count it when it is full."""
        if self._graph_log.replayed(num_tokens):
            self.flush_deferred()

    def before_warmup(self) -> None:
        """Count every use so far: the warm-up runs' uses are then all that is pending. The
        warm-up's calls also allocate the use logs their captures will write."""
        self._finish_cpu_lane()
        self.flush_deferred()
        self._warming_up = True

    def after_warmup(self) -> None:
        """Forget the uses of the eager warm-up runs before a capture (the CPU lane's too: they
        were never counted as misses, so they must not be moved out of them)."""
        self._deferred.clear()
        self._warming_up = False
        if self.cpu_lane is not None:
            self._finish_cpu_lane()
            counts = self.cpu_lane.take_counts()
            if self.on_cpu_lane_counts is not None:  # still a measurement of the lane
                self.on_cpu_lane_counts(counts)

    def _finish_cpu_lane(self) -> None:
        """Wait for the CPU-lane jobs enqueued so far (their counts are then all taken)."""
        if self.cpu_lane is not None and self.pool.device.type == "cuda":
            torch.cuda.synchronize(self.pool.device)

    @property
    def warming_up(self) -> bool:
        """Between `before_warmup` and `after_warmup`: the eager runs before a capture (a
        prefetcher must not learn from them)."""
        return self._warming_up

    # Prefetch path --------------------------------------------------------------------------

    def prefetch(self, experts: Iterable[ExpertId]) -> int:
        """Reserve slots for and submit prefetch copies of `experts` not yet resident.

        Experts the store does not hold (another rank's, under expert parallelism) are skipped.
        Stops early when no slot can be freed. Returns the number of prefetches issued.
        """
        self.flush_deferred()
        issued = 0
        for expert in experts:
            if not self.is_absent(expert) or not self.store.holds(expert):
                continue
            grant = self.table.reserve(expert)
            if grant is None:
                break
            if grant.evicted is not None:
                self._on_evict(grant.evicted)
            self._submit(expert, grant.slot, CopyLane.PREFETCH)
            self._prefetched.add(expert)
            self.stats.prefetches_issued += 1
            self.prefetch_counts.of(expert.layer).issued += 1
            issued += 1
        return issued

    def pending_prefetches(self, layer: int | None = None) -> list[ExpertId]:
        """Prefetches in flight and not yet used (of `layer`, or of every layer)."""
        return [e for e in self._in_flight
                if e in self._prefetched and (layer is None or e.layer == layer)]

    def cancel_prefetches(self, experts: Iterable[ExpertId] | None = None) -> int:
        """Give up prefetches still in flight (default: all) and free their slots.

        A prefetch whose copy has not started is cancelled; one already on a copy stream cannot
        be, so it is awaited on the device and kept as a ready (unused) expert. Returns the
        number cancelled.
        """
        cancelled = 0
        for expert in list(self.pending_prefetches() if experts is None else experts):
            ticket = self._in_flight.get(expert)
            if ticket is None or expert not in self._prefetched:
                continue
            del self._in_flight[expert]
            if self.engine.cancel(ticket):
                self._version[expert.layer] = self._version.get(expert.layer, 0) + 1
                self.table.cancel(expert)
                self._prefetched.discard(expert)
                self.stats.prefetches_cancelled += 1
                self.stats.prefetches_wasted += 1
                self.prefetch_counts.of(expert.layer).wasted += 1
                self.stats.bytes_copied -= ticket.nbytes
                cancelled += 1
            else:
                self.engine.wait(ticket)  # no host sync on CUDA; then fence its slot
                self.engine.release(ticket)
                self._mark_ready(expert)
        return cancelled

    def settle(self) -> None:
        """Mark prefetches whose copies have landed as ready (evictable) without waiting."""
        for expert in self.pending_prefetches():
            if self._in_flight[expert].done:
                del self._in_flight[expert]
                self._mark_ready(expert)

    # Internals ------------------------------------------------------------------------------

    def _submit(self, expert: ExpertId, slot: int, lane: CopyLane) -> None:
        self._version[expert.layer] = self._version.get(expert.layer, 0) + 1
        ticket = self.engine.submit(self.store.block(expert), self.pool.slot(slot), lane,
                                    key=expert)
        self._in_flight[expert] = ticket
        self._filled_by[slot] = ticket
        self.stats.bytes_copied += ticket.nbytes

    def _mark_ready(self, expert: ExpertId) -> None:
        self._version[expert.layer] = self._version.get(expert.layer, 0) + 1
        self.table.mark_ready(expert)

    def _on_evict(self, expert: ExpertId) -> None:
        if expert.layer in self._map_read_layers:  # its slot's readers hold no ticket fence
            self.engine.fence_current_stream()
        self._version[expert.layer] = self._version.get(expert.layer, 0) + 1
        self.stats.evictions += 1
        if expert in self._prefetched:  # prefetched, never used
            self._prefetched.discard(expert)
            self.stats.prefetches_wasted += 1
            self.prefetch_counts.of(expert.layer).wasted += 1
