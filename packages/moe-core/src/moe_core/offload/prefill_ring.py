"""Large calls (prefill chunks) of the on-demand executor with their missing experts streamed
through a small ring of staging slots at the link's rate, never admitted to the cache.

Dimension key: T tokens, K experts per token, D hidden, I expert width, E experts per layer,
N block elements, S cache slots, R ring slots, g experts of one grouped product.

Why (decision 0018): above the gather and grouped limits a call took the copy path, which
admits every miss to the decode's cache (evicting what the decode and the prefetcher put
there) and computes expert by expert with ~10 kernels and a pin, a copy wait and a release
each: at Qwen3-30B-A3B x 24 layers (S3) a 512-token prompt took 1.08 s where its missed bytes
need ~0.29 s over PCIe. A prompt of hundreds of tokens uses nearly every expert of every layer,
so admitting its misses only churns the cache. Here the misses go through R staging slots of
their own, copied by the copy engine (`cudaMemcpyAsync`, the link's full rate) while the
experts before them compute: MoE-Gen's ring, as `StreamingExecutor` runs it.

Per call (one MoE layer):
1. The layer's experts are put in an order before the routing is read: those absent from the
   cache first (the stream order), then those it holds (ready, or on their way as prefetches),
   each part by id. The tokens are grouped in that order (one host read of the routing, as on
   the copy path), so each part's assignments are contiguous.
2. The first R missing experts are copied into the ring at once (demand lane).
3. The held experts are computed from their slots while those copies land: gathered from the
   pool into a workspace (a device copy, up to `workspace_bytes`), one grouped product per
   workspace (`grouped_expert_mlp`).
4. The missing experts run in runs of R/2 consecutive ring slots: a run waits for its own
   copies, is computed by one grouped product, fences its slots for the copies that reuse them
   (`CopyEngine.release`), and the copies of the next R/2 go out. So run j+1 crosses the link
   while run j computes; at prefill sizes compute is far shorter than a run's copies, so the
   link never waits for it.
5. One scatter adds the weighted outputs back per token.

Counting: held experts are acquired from the cache (hits, prefetches used, LRU order, as
always); each streamed expert is a miss whose bytes cross PCIe (`bytes_copied`, and
`streamed_bytes` of them), never an admission: the cache's slots, table and versions are as the
call found them.

FP8 stores (decision 0015): ring slots hold e4m3 blocks as stored; each workspace or run is
dequantised to the activations' dtype just before its grouped product, within
`workspace_bytes`.
"""

from __future__ import annotations

from typing import Literal

import torch

from moe_core.expert_id import ExpertId
from moe_core.gathered_experts import GATHER_LIMIT_BYTES
from moe_core.offload.copy_engine import CopyLane, CopyTicket
from moe_core.offload.gpu_slots import GpuSlotPool
from moe_core.offload.grouped_mlp import grouped_expert_mlp
from moe_core.offload.layout import ExpertLayout
from moe_core.offload.slot_cache import ExpertSlotCache
from moe_core.offload.token_groups import TokenGroups

__all__ = ["MAX_RING_SLOTS", "PREFILL_MODES", "PREFILL_RING_BYTES", "PrefillMode", "PrefillRing",
           "ring_slots_for"]

PrefillMode = Literal["admit", "stream"]
"""How the on-demand executor's large calls treat experts missing from the cache: "admit" (the
copy path: copied into the cache, evicting others) or "stream" (`PrefillRing`)."""

PREFILL_MODES: tuple[PrefillMode, ...] = ("admit", "stream")

PREFILL_RING_BYTES = 128 * 2**20
"""The ring's default size in bytes (at most `MAX_RING_SLOTS` blocks, at least 2)."""

MAX_RING_SLOTS = 8
"""Most ring slots by default: runs of 4 double-buffered. At S3 a 9.4 MB copy takes ~0.17 ms
and a run of 4 experts of a 512-token prompt (~32 tokens each) computes in a small fraction of
the next run's copies, so a longer ring would not keep the link busier."""


def ring_slots_for(layout: ExpertLayout) -> int:
    """The default ring size R for experts of `layout`: as many blocks as `PREFILL_RING_BYTES`
    holds, between 2 (copy one while computing the other) and `MAX_RING_SLOTS` (S3: 8 blocks of
    9.4 MB, 75 MB; Mixtral's 336 MB experts: 2)."""
    return max(2, min(MAX_RING_SLOTS, PREFILL_RING_BYTES // layout.nbytes))


class PrefillRing:
    """Streams the missing experts of large calls through R staging slots of their own, shared
    by every layer's `OffloadedExecutor` of one cache (layers run one after another).

    Attributes:
        cache: The on-demand cache whose held experts are computed in place and whose stats
            count the streamed misses.
        slots: The ring: R blocks on the cache's device, apart from the cache's pool.
        run_length: Most missing experts computed by one grouped product (R/2, FP8 bounded by
            `workspace_bytes`).
        workspace_bytes: Most bytes a gathered group of held experts takes (their blocks and,
            for FP8, their dequantised matrices); the gathered path's limit by default, the
            transient memory the same executor already takes on decode calls.
        min_assignments: Smallest call (T*K) the ring takes: E by default, where a call under
            uniform routing already uses ~63% of the layer's experts (admitting them would
            replace most of what the cache holds of the layer).
    """

    def __init__(self, cache: ExpertSlotCache, num_slots: int | None = None,
                 workspace_bytes: int = GATHER_LIMIT_BYTES) -> None:
        """Allocate the ring (`num_slots` blocks; default `ring_slots_for` the cache's layout).

        Raises:
            ValueError: `num_slots` or `workspace_bytes` is not positive.
        """
        layout = cache.pool.layout
        num_slots = ring_slots_for(layout) if num_slots is None else num_slots
        if num_slots < 1:
            raise ValueError(f"a prefill ring needs at least one slot, got {num_slots}")
        if workspace_bytes <= 0:
            raise ValueError(f"workspace_bytes must be positive, got {workspace_bytes}")
        self.cache = cache
        self.slots = GpuSlotPool(layout, num_slots, cache.pool.device)
        self.workspace_bytes = workspace_bytes
        run_length = max(1, num_slots // 2)
        if layout.is_fp8:  # a run is dequantised whole: bound that workspace
            matrices_bytes = 2 * 3 * layout.hidden_size * layout.intermediate_size
            run_length = max(1, min(run_length, workspace_bytes // matrices_bytes))
        self.run_length = run_length
        self.min_assignments = cache.store.num_experts

    @property
    def num_slots(self) -> int:
        """R."""
        return self.slots.num_slots

    @property
    def nbytes(self) -> int:
        """Device bytes of the ring."""
        return self.slots.nbytes

    def takes(self, num_assignments: int) -> bool:
        """Whether a call of `num_assignments` (T*K) streams its misses here."""
        return num_assignments >= self.min_assignments

    def __call__(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                 weights: torch.Tensor) -> torch.Tensor:
        """`layer`'s experts on `hidden` `[T, D]` for ids and weights `[T, K]` -> `[T, D]`: held
        experts from their slots, missing ones streamed through the ring."""
        cache = self.cache
        num_experts = cache.store.num_experts
        absent: list[ExpertId] = []
        holding: list[ExpertId] = []  # ready, or on their way as prefetches
        for expert in (ExpertId(layer, e) for e in range(num_experts)):
            (absent if cache.is_absent(expert) else holding).append(expert)
        order = absent + holding  # place -> expert
        place = [0] * num_experts  # expert -> place
        for p, x in enumerate(order):
            place[x.expert] = p
        places = _on_device(place, hidden.device)[expert_ids]  # [T, K]
        groups = TokenGroups.build(places, weights, num_experts, hidden.dtype)  # the host read
        used = [p for p in range(num_experts) if groups.counts[p]]
        missing = [p for p in used if p < len(absent)]
        held = [p for p in used if p >= len(absent)]
        self._drop_stale_prefetches(layer, [order[p] for p in used])
        held_groups = _even_chunks(held, self._held_per_group())
        missing_runs = self._runs(missing)
        offsets = groups.group_offsets(held_groups + missing_runs)
        layout = self.slots.layout
        # FP8 blocks are dequantised to the activations' dtype: the products run in it.
        xs = groups.sorted_inputs(hidden, hidden.dtype if layout.is_fp8 else layout.dtype)
        ys = torch.empty_like(xs)  # [T*K, D], every row written below
        flights = _Flights(self, [order[p] for p in missing])
        flights.issue(self.num_slots)
        self._compute_held(held_groups, [order[p] for p in held], offsets[: len(held_groups)],
                           groups, xs, ys)
        for run, run_offsets in zip(missing_runs, offsets[len(held_groups):], strict=True):
            first = flights.consumed
            tickets = flights.take(len(run))
            cache.stalls.wait_all(cache.engine, tickets)
            rows = self.slots.rows(first % self.num_slots, len(run))  # [g, N]
            self._products(rows, run, run_offsets, groups, xs, ys)
            cache.engine.release(*tickets)  # copies reusing these slots wait for this
            flights.issue(flights.consumed + self.num_slots)
        cache.settle()
        return groups.combine(ys, hidden)

    # Internals ------------------------------------------------------------------------------

    def _held_per_group(self) -> int:
        """Held experts gathered into one workspace (at least one)."""
        return max(1, self.workspace_bytes // self.slots.layout.gather_nbytes)

    def _runs(self, missing: list[int]) -> list[list[int]]:
        """`missing` places cut into runs of consecutive ring slots (the i-th copy fills slot
        i mod R): at most `run_length` each, never across the ring's end."""
        runs: list[list[int]] = []
        for i, p in enumerate(missing):
            if not runs or len(runs[-1]) == self.run_length or i % self.num_slots == 0:
                runs.append([])
            runs[-1].append(p)
        return runs

    def _compute_held(self, held_groups: list[list[int]], held: list[ExpertId],
                      offsets: list[torch.Tensor], groups: TokenGroups, xs: torch.Tensor,
                      ys: torch.Tensor) -> None:
        """The held experts, gathered from the cache's slots a workspace at a time (their
        copies awaited first where they are prefetches still on their way)."""
        if not held:
            return
        cache = self.cache
        cache.acquire(held)  # all hold a slot: hits, never a copy or an eviction
        pool = cache.pool
        blocks = pool.storage.view(pool.num_slots, pool.layout.numel)  # [S, N]
        if pool.layout.is_fp8:  # gathered as bytes: every device indexes those
            blocks = blocks.view(torch.uint8)
        start = 0
        for group, group_offsets in zip(held_groups, offsets, strict=True):
            experts = held[start : start + len(group)]
            start += len(group)
            slots = _on_device(cache.ready_slots(experts), pool.device)  # [g]
            rows = blocks.index_select(0, slots).view(pool.storage.dtype)  # [g, N]
            self._products(rows, group, group_offsets, groups, xs, ys)
        cache.release(*held)  # fences their slots behind the reads just enqueued

    def _products(self, rows: torch.Tensor, group: list[int], offsets: torch.Tensor,
                  groups: TokenGroups, xs: torch.Tensor, ys: torch.Tensor) -> None:
        """One grouped product of the experts whose blocks are `rows` `[g, N]` on their tokens
        (the places `group`, contiguous in the sorted order), written into `ys`."""
        layout = self.slots.layout
        gate_up, down = (layout.dequantized_grouped(rows, xs.dtype) if layout.is_fp8
                         else layout.grouped_views(rows))  # [g, 2I, D], [g, D, I]
        span = slice(groups.starts[group[0]], groups.starts[group[-1]] + groups.counts[group[-1]])
        grouped_expert_mlp(xs[span], gate_up, down, [groups.counts[p] for p in group], offsets,
                           ys[span])

    def _drop_stale_prefetches(self, layer: int, used: list[ExpertId]) -> None:
        """This layer has routed: its prefetches it does not use are stale (they would also
        compete with the ring for the link)."""
        wanted = set(used)
        stale = [e for e in self.cache.pending_prefetches(layer) if e not in wanted]
        if stale:
            self.cache.cancel_prefetches(stale)


class _Flights:
    """One call's ring copies, issued in order (the i-th into slot i mod R) and consumed in
    order, counted as misses streamed over PCIe as they are issued."""

    def __init__(self, ring: PrefillRing, experts: list[ExpertId]) -> None:
        self._ring = ring
        self._experts = experts
        self._tickets: list[CopyTicket] = []
        self.consumed = 0

    def issue(self, upto: int) -> None:
        """Submit the copies up to the `upto`-th (fewer at the end): the caller has released
        every run before the `upto - R`-th, so each slot's last reader is fenced."""
        ring, cache = self._ring, self._ring.cache
        while len(self._tickets) < min(upto, len(self._experts)):
            i = len(self._tickets)
            expert = self._experts[i]
            ticket = cache.engine.submit(cache.store.block(expert),
                                         ring.slots.slot(i % ring.num_slots), CopyLane.DEMAND,
                                         key=expert)
            self._tickets.append(ticket)
            cache.stats.misses += 1
            cache.stats.bytes_copied += ticket.nbytes
            cache.stats.streamed_bytes += ticket.nbytes

    def take(self, count: int) -> list[CopyTicket]:
        """The next `count` copies, in the order issued (all already issued)."""
        tickets = self._tickets[self.consumed : self.consumed + count]
        assert len(tickets) == count, "a run's copies must be issued before it computes"
        self.consumed += count
        return tickets


def _even_chunks(items: list[int], most: int) -> list[list[int]]:
    """`items` in order, in as few chunks of at most `most` as possible, evenly sized."""
    if not items:
        return []
    count = -(-len(items) // most)
    size = -(-len(items) // count)
    return [items[i : i + size] for i in range(0, len(items), size)]


def _on_device(values: list[int], device: torch.device) -> torch.Tensor:
    """`values` as a long tensor on `device`, copied from pinned memory on CUDA (no host
    synchronisation)."""
    host = torch.tensor(values, dtype=torch.long)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)

