"""The on-demand offloaded executor: a layer's experts come from a shared GPU slot cache, misses
are fetched when the layer needs them, and a cold expert may be computed on the CPU instead.

Dimension key: T tokens, K experts per token, D hidden, N tokens of one expert.

Per call (one MoE layer): group the tokens by expert (one host read of the routing, see
`TokenGroups`); drop this layer's prefetches that the routing did not ask for (stale); pin every
needed expert and submit demand copies for all the misses before computing anything, so the
copies overlap the compute of the experts already resident; then compute each expert as one
matrix-product trio on all its tokens, waiting only for its own copy. Experts the CPU rule picks
(absent ones only) are computed from the host store while the GPU works (MoE-Infinity's
fetch-on-miss plus llama.cpp's CPU experts; DESIGN.md: at batch 1 the CPU can beat PCIe).

When one layer needs more experts than the pool can pin at once (a big batch in a small pool),
the experts are processed in waves that each fit.

Few tokens (decode) take the gather path instead: all needed experts are pinned and awaited, then
one gathered computation reads their slots (`gathered_experts`): ~12 kernels per layer whatever K
is, where the grouped path launches ~8 per expert and the step becomes bound by the CPU. When
every expert of the layer is resident, even the host read of the routing is skipped: a device
table maps expert to slot, and the uses are counted later (`ExpertSlotCache.layer_map`).

With a `MappedFetcher` (`fetch="mapped"` at install), few tokens never read the routing on the
host at all: the device table sends each resident expert to its slot and each missing one to its
block in pinned host memory, which the GPU reads itself (`mapped_fetch`). Misses are then not
admitted to the cache: what the cache holds is decided by prefetches (an engine's predictor) and
by experts made resident up front; the per-layer host synchronisation is gone (decision 0004).
That path can also be captured in a CUDA graph (`decode_runner`): under capture the call reads
the layer's persistent device table and logs its routing on the device (`GraphUseLog`); the
cache refreshes the tables and counts the log around each replay (its `GraphHooks`).

With `TwoLanes` (`two_lanes=True` at install) the mapped path splits each call's misses between
the GPU's reads and a CPU lane computing its share from the host store at the same time, still
without a host read of the routing, so it is captured too (`two_lanes`, decision 0009).

Calls above the gather limit but decode-sized (up to `grouped_limit_assignments` T*K) take the
grouped mapped path with a `MappedFetcher`: the call's distinct experts found on the device and
read once each, in chunks that fit the gather limit (`grouped_mapped`, decision 0016); captured
like the mapped path, on the GPU lane alone (no CPU-lane split yet).

Where Triton runs (CUDA), calls on the mapped path read their resident experts in their slots
and multiply as they read, with no gathered copy (`kernels.mapped_experts`, decision 0019); the
call's distinct misses are first copied over PCIe into staging rows, as many as the gather limit
holds (`MappedFetcher.stage_misses`, the copy kernel: faster over the link than the product
kernel's own reads, `stage_misses`), and any beyond them are read by the product kernel from host
memory. The workspace no longer grows with the call, so decode calls up to
`in_place_limit_assignments` T*K (16 tokens at top-8) take this path, captured, instead of the
grouped path, as long as the layer's expected misses fit the staging rows (decision 0020;
`_misses_fit`: bf16 batch 16 at 46% cached stays grouped, FP8 at 92% goes in place); the CPU
lane still splits only the calls whose assignments' blocks fit the gather limit (the shapes it
was measured on). Without Triton (the CPU) every row is built first as above.

Calls on the copy path that are large (prefill chunks: at least E assignments) stream their
misses instead with a `PrefillRing` (`prefill="stream"` at install, decision 0018): held experts
computed from their slots, missing ones copied through a small ring of staging slots at the
link's rate while the ones before them compute, none admitted to the cache.

Over an FP8 store (decision 0015) slots, mapped rows and copies carry e4m3 blocks as they are;
each path dequantises to the activations' dtype just before its products: the gathered paths
after gathering the call's blocks (`gathered_fp8_experts`), the per-expert waves one expert at a
time. Other dtypes take exactly the code they took before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal

import torch

from moe_core.expert_id import ExpertId
from moe_core.gathered_experts import GATHER_LIMIT_BYTES, gathered_experts, use_gather
from moe_core.kernels.backend import triton_mode
from moe_core.kernels.mapped_experts import mapped_experts, mapped_experts_supported
from moe_core.offload.fp8_gathered import gathered_fp8_experts
from moe_core.offload.grouped_mapped import (
    GROUPED_LIMIT_ASSIGNMENTS,
    GroupedPlan,
    grouped_mapped_experts,
)
from moe_core.offload.mapped_fetch import MappedFetcher
from moe_core.offload.prefetcher import Prefetcher
from moe_core.offload.prefill_ring import PrefillRing
from moe_core.offload.slot_cache import ExpertSlotCache, LayerMap
from moe_core.offload.token_groups import TokenGroups, expert_mlp
from moe_core.offload.two_lanes import TwoLanes

__all__ = ["CallPath", "CpuComputeRule", "OffloadedExecutor"]

CpuComputeRule = Callable[[ExpertId, int], bool]
"""`rule(expert, num_tokens)`: compute this absent expert on the CPU instead of fetching it."""

CallPath = Literal["mapped", "gather", "grouped", "stream", "copy"]
"""Which path a layer call takes (`OffloadedExecutor.call_path`): "mapped" (one row per
assignment read by the GPU, or every expert resident), "gather" (misses copied into slots, then
one gathered computation; the copy path if the pool cannot pin them all), "grouped" (distinct
experts read by the GPU in chunks), "stream" (tokens grouped by expert on the host, misses
streamed through the prefill ring) or "copy" (tokens grouped by expert on the host, misses
admitted to the cache)."""


class OffloadedExecutor:
    """`ExpertExecutor` of one MoE layer over an `ExpertSlotCache` shared by all layers.

    Attributes:
        cache: The shared slot cache (and its stats).
        layer: Decoder-layer index of this MoE block.
        cpu_compute_rule: Picks absent experts to compute on the CPU; None: always fetch.
        fetcher: Reads small calls' missing experts from host memory on the device (no host
            synchronisation, no admission); None: misses are copied into slots.
        two_lanes: With `fetcher`: small calls split their misses between the GPU's mapped
            reads and the CPU lane (`two_lanes`); None: the GPU reads every miss.
        prefetcher: Guesses later layers' experts around each call (`Prefetcher`); None: no
            prefetching.
        prefill_ring: Streams the misses of large calls that would take the copy path,
            without admitting them (`PrefillRing.takes`); None: the copy path admits them.
    """

    def __init__(self, cache: ExpertSlotCache, layer: int,
                 cpu_compute_rule: CpuComputeRule | None = None,
                 fetcher: MappedFetcher | None = None,
                 two_lanes: TwoLanes | None = None,
                 prefetcher: Prefetcher | None = None,
                 prefill_ring: PrefillRing | None = None) -> None:
        if two_lanes is not None and fetcher is None:
            raise ValueError("two lanes need the mapped fetch (fetch='mapped')")
        if prefill_ring is not None and cpu_compute_rule is not None:
            raise ValueError("a prefill ring streams every miss of large calls; it does not "
                             "combine with a cpu_compute_rule")
        if prefill_ring is not None and prefill_ring.cache is not cache:
            raise ValueError("the prefill ring belongs to another cache")
        self.cache = cache
        self.layer = layer
        self.cpu_compute_rule = cpu_compute_rule
        self.fetcher = fetcher
        self.two_lanes = two_lanes
        self.prefetcher = prefetcher
        self.prefill_ring = prefill_ring
        self.gather_limit_bytes = GATHER_LIMIT_BYTES  # 0: always group tokens by expert
        # with `fetcher`: most T*K of a call on the grouped mapped path (0: none)
        self.grouped_limit_assignments = GROUPED_LIMIT_ASSIGNMENTS
        # mapped calls in place: misses copied to staging rows by the copy kernel first (True),
        # or read over PCIe by the product kernel itself (False); see decision 0019
        self.stage_misses = True
        # in place: most T*K of a call on the mapped path (decision 0020); larger calls take the
        # grouped, stream or copy path
        self.in_place_limit_assignments = GROUPED_LIMIT_ASSIGNMENTS
        # in place above the staging rows: most expected misses per row (`_misses_fit`; inf:
        # always in place up to the limit)
        self.in_place_misses_per_row = 1.0
        self._plans: dict[tuple[int, int], GroupedPlan] = {}  # (T*K, workspace) -> plan

    @property
    def graph_safe(self) -> bool:
        """Decode steps through this executor can be captured: mapped fetch, no CPU compute."""
        return self.fetcher is not None and self.cpu_compute_rule is None

    @property
    def capture_key(self) -> object:
        """What a captured call depends on besides this executor: the two-lane path's current
        set of lanes (its CPU lane's semaphores are posted and awaited by the graph; a shape
        whose lane stops paying is dropped and the key changes), or None."""
        return None if self.two_lanes is None else self.two_lanes.capture_token

    @property
    def graph_hooks(self) -> ExpertSlotCache | None:
        """What the decode runner calls around replays (the shared cache), when graph-safe."""
        return self.cache if self.graph_safe else None

    def graph_token_limit(self, top_k: int) -> int:
        """Most tokens per call a captured step may have: the call must take the mapped path
        (in place up to `in_place_limit_assignments`, else while the rows of all assignments fit
        the gather limit) or be small enough for the grouped mapped path (above both a call
        reads its routing on the host)."""
        if self._in_place():
            tokens = self.in_place_limit_assignments // top_k
        else:
            tokens = self.gather_limit_bytes // (top_k * self._mapped_nbytes())
        if self._grouped_applies(self.grouped_limit_assignments):
            return max(tokens, self.grouped_limit_assignments // top_k)
        return tokens

    def call_path(self, num_assignments: int) -> CallPath:
        """The path a call of `num_assignments` (T*K) token-expert assignments takes."""
        if self._takes_mapped(num_assignments):
            return "mapped" if self.fetcher is not None else "gather"
        if self._grouped_applies(num_assignments):
            return "grouped"
        if self.prefill_ring is not None and self.prefill_ring.takes(num_assignments):
            return "stream"
        return "copy"

    def prefetch(self, experts: Iterable[ExpertId]) -> int:
        """Prefetch hint (experts of any layer); returns the number of copies issued."""
        return self.cache.prefetch(experts)

    def cancel_prefetches(self) -> int:
        """Cancel every prefetch in flight and not yet used; returns how many were cancelled."""
        return self.cache.cancel_prefetches()

    def __call__(self, hidden: torch.Tensor, expert_ids: torch.Tensor,
                 weights: torch.Tensor) -> torch.Tensor:
        """See `ExpertExecutor`: `hidden` `[T, D]`, ids and weights `[T, K]` -> `[T, D]`."""
        prefetching = self._begin_prefetch(hidden, expert_ids)  # prefetch: see the end
        out = self._compute(hidden, expert_ids, weights)
        if prefetching:
            self._end_prefetch()
        return out

    def _compute(self, hidden: torch.Tensor, expert_ids: torch.Tensor,
                 weights: torch.Tensor) -> torch.Tensor:
        """The layer's experts on `hidden` (what `__call__` does besides prefetching)."""
        if self._takes_mapped(expert_ids.numel()):
            if (self.fetcher is not None and hidden.is_cuda
                    and torch.cuda.is_current_stream_capturing()):
                return self._mapped(hidden, expert_ids, weights,
                                    self.cache.log_graph_use(self.layer, expert_ids))
            if (self.two_lanes is not None and self.cache.warming_up
                    and self._lane_applies(expert_ids.numel())):
                self._prepare_lane(expert_ids)
            layer_map = self.cache.layer_map(self.layer)
            if layer_map.complete:  # every expert resident: no host read of the routing at all
                out = (self._gpu_lane(hidden, expert_ids, weights, layer_map.slots,
                                      misses=False)
                       if self._in_place()
                       else self._over_slots(hidden, layer_map.slots[expert_ids], weights))
                self.cache.use_layer_map(layer_map, self.layer, expert_ids)
                return out
            if self.fetcher is not None:  # misses read from host memory by the GPU
                out = self._mapped(hidden, expert_ids, weights, layer_map)
                self.cache.use_layer_map(layer_map, self.layer, expert_ids)
                return out
            gathered = self._gathered(hidden, expert_ids, weights)
            if gathered is not None:
                return gathered
        elif self._grouped_applies(expert_ids.numel()):
            return self._grouped(hidden, expert_ids, weights)
        if self.prefill_ring is not None and self.prefill_ring.takes(expert_ids.numel()):
            return self.prefill_ring(self.layer, hidden, expert_ids, weights)
        groups = TokenGroups.build(expert_ids, weights, self.cache.store.num_experts,
                                   hidden.dtype)
        needed = [ExpertId(self.layer, e) for e in groups.experts()]
        self._drop_stale_prefetches(needed)
        on_cpu = [x for x in needed if self._on_cpu(x, groups.counts[x.expert])]
        cpu_set = set(on_cpu)
        # Token rows go to the host before any GPU expert is enqueued: the device-to-host copy
        # is stream-ordered, so issued later it would wait for those experts' kernels.
        cpu_inputs = {x: hidden[groups.rows(x.expert)].cpu() for x in on_cpu}
        out = torch.zeros_like(hidden)  # [T, D]
        for wave in self._waves([x for x in needed if x not in cpu_set]):
            for expert in self.cache.acquire(wave):
                gate, up, down = self.cache.weights(expert, hidden.dtype)
                self._accumulate(out, hidden, groups, expert.expert, gate, up, down)
                self.cache.release(expert)
        for expert in on_cpu:  # runs on the host while the GPU works through the waves
            gate, up, down = self.cache.store.weights(expert, hidden.dtype)
            y = expert_mlp(cpu_inputs[expert], gate, up, down).to(hidden.device)  # [N, D]
            out.index_add_(0, groups.rows(expert.expert), y * groups.expert_weights(expert.expert))
            self.cache.stats.cpu_experts += 1
            self.cache.stats.cpu_tokens += groups.counts[expert.expert]
        self.cache.settle()
        return out

    # Internals ------------------------------------------------------------------------------

    def _prepare_lane(self, expert_ids: torch.Tensor) -> None:
        """Before a capture (its warm-up): make this call shape's split and this layer's lane
        job now, even if this warm-up call does not need them (a fully cached layer): the
        capture reads host memory through them, and tensors made inside a capture are refilled
        by every replay (the split's counts of misses would restart each step)."""
        assert self.two_lanes is not None
        if self.two_lanes.split(*expert_ids.shape) is not None:
            self.two_lanes.lane.job(self.layer, *expert_ids.shape)

    def _mapped(self, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                layer_map: LayerMap) -> torch.Tensor:
        """Every assignment's expert read by the GPU from its slot or from host memory (or,
        with two lanes, the misses the split gives the CPU computed there at the same time)."""
        lut = layer_map.slots
        lanes = self.two_lanes
        split = (None if lanes is None or not self._lane_applies(expert_ids.numel())
                 else lanes.split(*expert_ids.shape))
        if lanes is None or split is None:  # one lane (or the GPU alone is faster here)
            return self._gpu_lane(hidden, expert_ids, weights, lut)
        job, gpu_lut = lanes.start(self.layer, hidden, expert_ids, weights, lut, split)
        return lanes.finish(job, self._gpu_lane(hidden, expert_ids, weights, gpu_lut))

    def _takes_mapped(self, num_assignments: int) -> bool:
        """Whether a call of `num_assignments` (T*K) takes the mapped path (or, without a
        fetcher, the gather path): in place, up to `in_place_limit_assignments`; otherwise while
        its rows fit the gather limit. Never with a CPU compute rule; a gather limit of 0 keeps
        its meaning (every call groups its tokens on the host)."""
        if self.cpu_compute_rule is not None:
            return False
        if self._in_place():
            return (0 < num_assignments <= self.in_place_limit_assignments
                    and self._misses_fit(num_assignments))
        return use_gather(num_assignments, self._mapped_nbytes(), self.gather_limit_bytes)

    def _misses_fit(self, num_assignments: int) -> bool:
        """Whether an in-place call of `num_assignments` expects its misses to fit the staging
        rows: the layer's share of absent experts times the assignments (an upper bound of the
        distinct misses) at most the rows (times `in_place_misses_per_row`). Above that the
        misses the product kernel reads from host memory itself, slower than the copy kernel
        and once per assignment, cost more than the grouped path's: bf16 batch 16 at 46%
        cached took 322 ms in place against 227 grouped on the H200 (decision 0020). Always
        True without `stage_misses`."""
        rows = self._staging_rows(num_assignments)
        if not self.stage_misses or num_assignments <= rows:
            return True
        absent = 1.0 - self.cache.layer_map(self.layer).resident / self.cache.store.num_experts
        return num_assignments * absent <= rows * self.in_place_misses_per_row

    def _lane_applies(self, num_assignments: int) -> bool:
        """Whether the CPU lane may split a mapped call of `num_assignments`: one staged block
        per assignment fits the gather limit (the shapes decision 0009's split was measured on;
        larger in-place calls run on the GPU lane alone)."""
        return use_gather(num_assignments, self.cache.store.layout.nbytes,
                          self.gather_limit_bytes)

    def _grouped_applies(self, num_assignments: int) -> bool:
        """Whether a call of `num_assignments` above the gather limit takes the grouped mapped
        path (a gather limit of 0 keeps its meaning: every call groups its tokens on the host)."""
        return (self.fetcher is not None and self.cpu_compute_rule is None
                and self.gather_limit_bytes > 0
                and 0 < num_assignments <= self.grouped_limit_assignments)

    def _grouped(self, hidden: torch.Tensor, expert_ids: torch.Tensor,
                 weights: torch.Tensor) -> torch.Tensor:
        """A call above the gather limit on the mapped path: its distinct experts read once each
        by the GPU, in chunks that fit the gather limit (`grouped_mapped`); uses counted like
        the mapped path's (deferred, or logged on the device under capture)."""
        assert self.fetcher is not None
        key = (expert_ids.numel(), self.gather_limit_bytes)  # the workspace is the gather limit
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = GroupedPlan.for_call(
                key[0], self.cache.store.num_experts, self.cache.store.layout.gather_nbytes,
                self.gather_limit_bytes)  # FP8: the block and its dequantised matrices
        if hidden.is_cuda and torch.cuda.is_current_stream_capturing():
            layer_map = self.cache.log_graph_use(self.layer, expert_ids)
            return grouped_mapped_experts(hidden, expert_ids, weights, self.fetcher, self.layer,
                                          layer_map.slots, plan)
        layer_map = self.cache.layer_map(self.layer)
        out = grouped_mapped_experts(hidden, expert_ids, weights, self.fetcher, self.layer,
                                     layer_map.slots, plan)
        self.cache.use_layer_map(layer_map, self.layer, expert_ids)
        return out

    def _gpu_lane(self, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                  lut: torch.Tensor, misses: bool = True) -> torch.Tensor:
        """The experts `lut` `[E]` sends to a slot (>= 0) or to host memory (-1), read by the
        GPU; those it marks -2 (the CPU lane's) contribute zero. `misses=False`: `lut` sends
        every expert of the call to a slot (nothing to stage)."""
        assert self.fetcher is not None
        one_token = expert_ids.shape[0] == 1  # top-k ids are distinct
        layout = self.cache.store.layout
        if self._in_place():  # resident experts read in their slots, multiplied as they are read
            pool = self.cache.pool.storage.view(self.cache.pool.num_slots, layout.numel)
            host = self.cache.store.arena(self.layer).view(self.cache.store.num_experts, -1)
            if mapped_experts_supported(hidden, layout, pool, host):
                staging = self._staging_rows(expert_ids.numel()) if misses else 0
                if staging == 0:  # every miss read over PCIe by the product kernel itself
                    return mapped_experts(hidden, expert_ids, weights, lut, pool, host, layout)
                call_lut, staged = self.fetcher.stage_misses(
                    self.layer, expert_ids.reshape(-1), lut, staging)
                return mapped_experts(hidden, expert_ids, weights, call_lut, pool, host, layout,
                                      staged_rows=staged)
        rows, index = self.fetcher.fetch_rows(self.layer, expert_ids.reshape(-1), lut,
                                              distinct=one_token)
        index = None if index is None else index.view_as(expert_ids)
        if layout.is_fp8:
            return gathered_fp8_experts(hidden, index, weights, layout, rows)
        return gathered_experts(hidden, index, weights, *layout.stacked_views(rows))

    def _in_place(self) -> bool:
        """Whether mapped calls multiply in place (`kernels.mapped_experts`): a fetcher, Triton
        for the pool's device (compiled on CUDA, or its interpreter when asked for), and a
        gather limit above 0 (0 keeps its meaning: every call groups its tokens on the host)."""
        return (self.fetcher is not None and self.gather_limit_bytes > 0
                and triton_mode(self.cache.pool.device) is not None)

    def _staging_rows(self, num_assignments: int) -> int:
        """Staging rows of an in-place call (R of `kernels.miss_staging`): as many blocks as the
        gather limit holds, no more than the call can have distinct experts; 0 without
        `stage_misses`."""
        if not self.stage_misses:
            return 0
        return min(self.gather_limit_bytes // self.cache.store.layout.nbytes, num_assignments,
                   self.cache.store.num_experts)

    def _mapped_nbytes(self) -> int:
        """Device workspace of one assignment on the mapped path as rows (not in place), what
        the gather limit counts: its row (FP8: plus its 16-bit matrices)."""
        return self.cache.store.layout.gather_nbytes

    def _over_slots(self, hidden: torch.Tensor, slots: torch.Tensor,
                    weights: torch.Tensor) -> torch.Tensor:
        """The gathered computation of every assignment over the pool's slots (`slots` `[T, K]`
        the slot of each)."""
        pool = self.cache.pool
        if pool.layout.is_fp8:
            return gathered_fp8_experts(hidden, slots, weights, pool.layout,
                                        pool.rows(0, pool.num_slots))
        return gathered_experts(hidden, slots, weights, *pool.stacked())

    def _gathered(self, hidden: torch.Tensor, expert_ids: torch.Tensor,
                  weights: torch.Tensor) -> torch.Tensor | None:
        """Few tokens: every needed expert pinned at once, then one gathered computation over
        the pool's slots (`gathered_experts`). None when the pool cannot pin them all."""
        ids = expert_ids.cpu()  # [T, K] the one host read of the layer
        needed = [ExpertId(self.layer, e) for e in sorted(set(ids.view(-1).tolist()))]
        self._drop_stale_prefetches(needed)
        pending = set(self.cache.pending_prefetches())
        if sum(1 for e in needed if e not in pending) > self.cache.capacity():
            return None
        order = self.cache.acquire(needed)
        slots = self.cache.ready_slots(order)
        lookup = torch.zeros(self.cache.store.num_experts, dtype=torch.long)  # [E] expert -> slot
        lookup[[e.expert for e in order]] = torch.tensor(slots)
        index = lookup[ids].to(hidden.device, non_blocking=True)  # [T, K]
        out = self._over_slots(hidden, index, weights)
        self.cache.release(*order)
        self.cache.settle()
        return out

    @staticmethod
    def _accumulate(out: torch.Tensor, hidden: torch.Tensor, groups: TokenGroups, expert: int,
                    gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
        rows = groups.rows(expert)  # [N]
        y = expert_mlp(hidden[rows], gate, up, down)  # [N, D]
        out.index_add_(0, rows, y * groups.expert_weights(expert))

    def _on_cpu(self, expert: ExpertId, num_tokens: int) -> bool:
        rule = self.cpu_compute_rule
        return rule is not None and self.cache.is_absent(expert) and rule(expert, num_tokens)

    def _drop_stale_prefetches(self, needed: list[ExpertId]) -> None:
        """This layer has routed: its prefetches it does not use are stale."""
        wanted = set(needed)
        stale = [e for e in self.cache.pending_prefetches(self.layer) if e not in wanted]
        if stale:
            self.cache.cancel_prefetches(stale)

    def _waves(self, experts: list[ExpertId]) -> Iterable[list[ExpertId]]:
        """Split `experts` into groups that can all be pinned at once.

        Relies on nothing being pinned between calls (every executor releases what it
        acquires). Experts already on their way (prefetched) hold their own slots, so they go
        first and cost no capacity.
        """
        pending = set(self.cache.pending_prefetches())
        todo = sorted(experts, key=lambda e: e not in pending)  # prefetched first (stable)
        while todo:
            capacity = self.cache.capacity()
            if capacity < 1 and todo[0] not in pending:
                self.cache.cancel_prefetches()  # other layers' prefetches block the pool
                pending.clear()
                capacity = self.cache.capacity()
            wave: list[ExpertId] = []
            while todo and (todo[0] in pending or len(wave) < capacity):
                wave.append(todo.pop(0))
            yield wave

    # Prefetching (a `Prefetcher` around each call) ----------------------------------------------

    def _begin_prefetch(self, hidden: torch.Tensor, expert_ids: torch.Tensor) -> bool:
        """Let the prefetcher start its guess; False (and nothing done) without one, inside a
        CUDA-graph capture (no Python runs at replay: the cache's `before_replay` asks it
        between steps instead) and in the warm-up runs before a capture."""
        if (self.prefetcher is None or self.cache.warming_up
                or (hidden.is_cuda and torch.cuda.is_current_stream_capturing())):
            return False
        self.prefetcher.begin_layer(self.layer, hidden, expert_ids, self.cache)
        return True

    def _end_prefetch(self) -> None:
        """Submit the prefetcher's guesses once this layer's compute is enqueued (its own
        experts were acquired first, so a guess cannot evict one of them)."""
        assert self.prefetcher is not None
        experts = self.prefetcher.end_layer(self.layer, self.cache)
        if experts:
            self.cache.prefetch(experts)
