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

from collections.abc import Iterable

import torch

from moe_core.expert_id import ExpertId
from moe_core.offload.copy_engine import CopyEngine, CopyLane, CopyTicket
from moe_core.offload.gpu_slots import GpuSlotPool
from moe_core.offload.host_store import HostExpertStore
from moe_core.offload.residency import Residency, ResidencyTable
from moe_core.offload.stall_timer import StallTimer
from moe_core.offload.stats import OffloadStats

__all__ = ["ExpertSlotCache"]


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
        self._luts: dict[int, tuple[int, torch.Tensor | None, list[CopyTicket]]] = {}
        self._deferred: list[tuple[int, torch.Tensor]] = []  # (layer, ids) not yet counted

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
            (coming if expert in self._in_flight else ready).append(expert)
        return ready + coming + fetched

    def weights(self, expert: ExpertId) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(gate, up, down)` slot views of an acquired expert, once its copy has landed (on
        CUDA: once the compute stream has been told to wait for it)."""
        ticket = self._in_flight.pop(expert, None)
        if ticket is not None:
            self.stalls.wait(self.engine, ticket)
            self.table.mark_ready(expert)
        slot = self.table.slot_of(expert)
        if slot is None:
            raise RuntimeError(f"{expert} holds no slot; acquire it first")
        return self.pool.weights(slot)

    def ready_slots(self, experts: list[ExpertId]) -> list[int]:
        """The slots of acquired `experts`, once all their copies have landed (on CUDA: once
        the compute stream has been told to wait for them), timed as one stall."""
        tickets = [self._in_flight.pop(e) for e in experts if e in self._in_flight]
        self.stalls.wait_all(self.engine, tickets)
        for ticket in tickets:
            assert isinstance(ticket.key, ExpertId)
            self.table.mark_ready(ticket.key)
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

    # Whole-layer fast path ------------------------------------------------------------------

    def layer_lut(self, layer: int) -> torch.Tensor | None:
        """Expert -> slot `[E]` on the device when every expert of `layer` is resident and
        ready (no copy in flight), else None. Rebuilt only after the layer's slots changed.

        With it a layer runs without reading its routing on the host: see `use_layer_lut`.
        """
        if any(e.layer == layer for e in self._in_flight):
            return None
        version = self._version.get(layer, 0)
        cached = self._luts.get(layer)
        if cached is not None and cached[0] == version:
            return cached[1]
        slots = [self.table.slot_of(ExpertId(layer, e)) for e in range(self.store.num_experts)]
        lut = None
        fills: list[CopyTicket] = []
        if all(slot is not None for slot in slots):
            lut = torch.tensor(slots, dtype=torch.long).to(self.pool.device)  # [E]
            fills = [self._filled_by[s] for s in slots if s in self._filled_by]  # type: ignore[index]
        self._luts[layer] = (version, lut, fills)
        return lut

    def use_layer_lut(self, layer: int, expert_ids: torch.Tensor) -> None:
        """After a layer's compute over its LUT was enqueued: fence the layer's slots (one
        event) and count the uses later, when the routing is next read on the host anyway."""
        self.engine.release(*self._luts[layer][2])
        self._deferred.append((layer, expert_ids))

    def flush_deferred(self) -> None:
        """Count the fast path's uses: hits, and accesses for the policy (one host read)."""
        if not self._deferred:
            return
        deferred, self._deferred = self._deferred, []
        for layer, ids in deferred:
            for e in sorted(set(ids.view(-1).tolist())):
                expert = ExpertId(layer, e)
                self.table.touch(expert)
                self.stats.hits += 1
                if expert in self._prefetched:
                    self._prefetched.discard(expert)
                    self.stats.prefetches_used += 1

    # Prefetch path --------------------------------------------------------------------------

    def prefetch(self, experts: Iterable[ExpertId]) -> int:
        """Reserve slots for and submit prefetch copies of `experts` not yet resident.

        Stops early when no slot can be freed. Returns the number of prefetches issued.
        """
        self.flush_deferred()
        issued = 0
        for expert in experts:
            if not self.is_absent(expert):
                continue
            grant = self.table.reserve(expert)
            if grant is None:
                break
            if grant.evicted is not None:
                self._on_evict(grant.evicted)
            self._submit(expert, grant.slot, CopyLane.PREFETCH)
            self._prefetched.add(expert)
            self.stats.prefetches_issued += 1
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
                self.stats.bytes_copied -= ticket.nbytes
                cancelled += 1
            else:
                self.engine.wait(ticket)  # no host sync on CUDA; then fence its slot
                self.engine.release(ticket)
                self.table.mark_ready(expert)
        return cancelled

    def settle(self) -> None:
        """Mark prefetches whose copies have landed as ready (evictable) without waiting."""
        for expert in self.pending_prefetches():
            if self._in_flight[expert].done:
                del self._in_flight[expert]
                self.table.mark_ready(expert)

    # Internals ------------------------------------------------------------------------------

    def _submit(self, expert: ExpertId, slot: int, lane: CopyLane) -> None:
        self._version[expert.layer] = self._version.get(expert.layer, 0) + 1
        ticket = self.engine.submit(self.store.block(expert), self.pool.slot(slot), lane,
                                    key=expert)
        self._in_flight[expert] = ticket
        self._filled_by[slot] = ticket
        self.stats.bytes_copied += ticket.nbytes

    def _on_evict(self, expert: ExpertId) -> None:
        self._version[expert.layer] = self._version.get(expert.layer, 0) + 1
        self.stats.evictions += 1
        self._prefetched.discard(expert)
