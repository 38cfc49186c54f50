"""Installing the offload runtime into a model: one shared cache (or ring) and one set of
counters for every MoE block, each block's routed experts then run through an offloaded executor.

Typical use::

    store = HostExpertStore.from_model(model)          # or from_checkpoint(folder)
    pool = GpuSlotPool.for_budget(store.layout, parse_bytes("12GiB"), "cuda")
    runtime = install_offloading(model, store, pool, make_copy_engine("cuda"),
                                 drop_local_experts=True)
    model(input_ids)
    print(runtime.summary())
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from moe_core.expert_id import ExpertId
from moe_core.experts import ExpertExecutor
from moe_core.model import MoEForCausalLM
from moe_core.moe_block import MoEBlock
from moe_core.offload.copy_engine import CopyEngine
from moe_core.offload.gpu_slots import GpuSlotPool
from moe_core.offload.host_store import HostExpertStore
from moe_core.offload.lane_signals import HANDOVERS
from moe_core.offload.lane_split import LaneRates
from moe_core.offload.mapped_fetch import MappedFetcher
from moe_core.offload.offloaded_executor import CpuComputeRule, OffloadedExecutor
from moe_core.offload.policy import EvictionPolicy, LRUPolicy
from moe_core.offload.prefetch_counts import LayerPrefetches
from moe_core.offload.prefetcher import Prefetcher
from moe_core.offload.prefill_ring import PREFILL_MODES, PrefillMode, PrefillRing
from moe_core.offload.residency import ResidencyTable
from moe_core.offload.slot_cache import ExpertSlotCache
from moe_core.offload.stall_timer import StallTimer
from moe_core.offload.stats import OffloadStats
from moe_core.offload.streaming_executor import ExpertRing, StreamingExecutor
from moe_core.offload.two_lanes import TwoLanes, calibrate_lanes

__all__ = ["FetchMode", "OffloadKind", "OffloadRuntime", "install_offloading"]

OffloadKind = Literal["on_demand", "streaming"]
FetchMode = Literal["copy", "mapped"]


@dataclass
class OffloadRuntime:
    """What `install_offloading` built, and the handles the engines use.

    Attributes:
        kind: `"on_demand"` or `"streaming"`.
        store: Host tier.
        pool: Device slots.
        engine: Copy engine.
        stats: Counters shared by every layer (`snapshot()` adds the copy and stall times).
        executors: Decoder-layer index -> the executor installed in that MoE block.
        cache: The shared slot cache (on-demand), else None.
        ring: The shared ring (streaming), else None.
        dropped_local_experts: The blocks' own expert weights were freed (no way back).
        two_lanes: Two-lane decode's CPU lane and measured rates (on-demand, mapped), else None.
        prefetcher: What guesses later layers' experts (on-demand), else None.
        prefill_ring: Streams large calls' misses (on-demand, `prefill="stream"`), else None.
    """

    kind: OffloadKind
    store: HostExpertStore
    pool: GpuSlotPool
    engine: CopyEngine
    stats: OffloadStats
    executors: dict[int, ExpertExecutor]
    blocks: list[MoEBlock] = field(repr=False)
    stalls: StallTimer = field(repr=False)
    cache: ExpertSlotCache | None = None
    ring: ExpertRing | None = None
    dropped_local_experts: bool = False
    _copy_seconds_at_start: float = 0.0
    two_lanes: TwoLanes | None = None
    prefetcher: Prefetcher | None = None
    prefill_ring: PrefillRing | None = None

    def prefetch(self, experts: Iterable[ExpertId]) -> int:
        """Prefetch hint (on-demand only; streaming ignores hints and returns 0)."""
        return self.cache.prefetch(experts) if self.cache is not None else 0

    def cancel_prefetches(self) -> int:
        """Cancel every stale prefetch; returns how many were cancelled."""
        return self.cache.cancel_prefetches() if self.cache is not None else 0

    def begin_sequence(self) -> None:
        """A new request starts: the prefetcher forgets the last one (nothing without one)."""
        if self.prefetcher is not None:
            self.prefetcher.begin_sequence()

    def prefetch_by_layer(self) -> dict[int, LayerPrefetches]:
        """Prefetches issued, used and wasted per layer so far (empty for streaming)."""
        return self.cache.prefetch_counts.by_layer() if self.cache is not None else {}

    def snapshot(self, block: bool = False) -> OffloadStats:
        """The counters so far, with `copy_seconds` from the engine and the stalls measured so
        far (`block`: wait for the device to finish measuring, end of a run)."""
        if self.cache is not None:
            self.cache.flush_deferred()
        stats = self.stats.copy()
        stats.stall_seconds = self.stalls.collect(block)
        stats.copy_seconds = self.engine.copy_seconds - self._copy_seconds_at_start
        return stats

    def summary(self) -> dict[str, int | float]:
        """`snapshot(block=True).summary()` plus the pool's size: the `--stats` output."""
        out = self.snapshot(block=True).summary()
        out["num_slots"] = self.pool.num_slots
        out["pool_bytes"] = self.pool.nbytes
        if self.prefill_ring is not None:
            out["prefill_ring_slots"] = self.prefill_ring.num_slots
        if self.two_lanes is not None:
            lanes = self.two_lanes
            for key, value in lanes.calibration.summary().items():
                if not isinstance(value, str):
                    out[f"lanes_{key}"] = float(value)
            out["lanes_cpu_gb_per_s_now"] = lanes.rates.cpu_bytes_per_s / 1e9
            out["lanes_cpu_fixed_us_now"] = lanes.rates.cpu_fixed_s * 1e6
            out["lanes_refits"] = lanes.refits
            out["lanes_round_trip_us"] = lanes.round_trip_s * 1e6
            out["lanes_declined_shapes"] = len(lanes.declined)
            out["lanes_dropped_shapes"] = len(lanes.dropped)
            out["lanes_flags"] = int(lanes.lane.signals.name == "flags")
        return out

    def drain(self) -> None:
        """Finish every queued copy (end of a run)."""
        self.engine.drain()
        if self.cache is not None:
            self.cache.settle()

    def uninstall(self) -> None:
        """Give every MoE block its own `LocalExperts` back.

        Raises:
            RuntimeError: the local expert weights were dropped.
        """
        if self.dropped_local_experts:
            raise RuntimeError("the blocks' local expert weights were dropped at install; "
                               "reload the model to run without offloading")
        self.drain()
        for block in self.blocks:
            block.set_executor(block.experts)
        self.close()

    def close(self) -> None:
        """Stop the CPU lane's worker thread, if there is one (after everything enqueued); the
        executors then read every miss on the GPU (and a decode runner drops the steps it
        captured with the lane: the executors' `capture_key` changed)."""
        if self.two_lanes is not None:
            for executor in self.executors.values():
                if isinstance(executor, OffloadedExecutor):
                    executor.two_lanes = None
            self.two_lanes.close()
            self.two_lanes = None


def install_offloading(model: MoEForCausalLM, store: HostExpertStore, pool: GpuSlotPool,
                       engine: CopyEngine, policy: EvictionPolicy | None = None,
                       kind: OffloadKind = "on_demand", *,
                       cpu_compute_rule: CpuComputeRule | None = None,
                       resident: Iterable[ExpertId] = (), ring_size: int = 2,
                       fetch: FetchMode = "copy", time_stalls: bool = True,
                       drop_local_experts: bool = False,
                       lookahead_min_share: float | None = 0.5, max_group: int = 8,
                       two_lanes: bool = False, cpu_kernel: str = "auto",
                       lane_rates: LaneRates | None = None, handover: str = "auto",
                       prefetcher: Prefetcher | None = None,
                       prefill: PrefillMode = "admit",
                       prefill_ring_slots: int | None = None) -> OffloadRuntime:
    """Run every MoE block of `model` through offloaded experts.

    Args:
        model: The model (dense weights where compute runs, i.e. on `pool.device`).
        store: Every routed expert in host memory (e.g. `HostExpertStore.from_model(model)`);
            an FP8 store (`fp8.FP8`) runs on every path, its blocks dequantised just before
            the products (decisions 0011, 0015).
        pool: The device slots; all of them go to this runtime.
        engine: Copies from `store` into `pool` (a `CpuCopyEngine` for a CPU pool).
        policy: Eviction policy of the on-demand cache (default LRU); unused by streaming.
        kind: `"on_demand"` (cache + fetch on miss + prefetch hints) or `"streaming"` (every
            non-resident expert streamed through a ring each call: large batches).
        cpu_compute_rule: On-demand only: `rule(expert, num_tokens)` picks absent experts to
            compute on the CPU from `store` instead of fetching them.
        resident: Streaming only: experts kept in their own slots for good.
        ring_size: Streaming only: slots in the ring (at least 2).
        lookahead_min_share: Streaming only: when a layer uses at least this share of its
            experts (a large batch), its call fills the ring's free slots with the next layer's
            likely experts before that layer's routing is known (None: never; see
            `ExpertRing`).
        max_group: Streaming only: most experts one grouped product computes (and one copy
            carries; `ExpertRing.max_group`).
        fetch: On-demand only. `"copy"`: a miss is copied into a slot (admitted to the cache by
            the policy; one host read of the routing per layer). `"mapped"`: small calls
            (decode) read their misses straight from pinned host memory on the GPU, with no
            host synchronisation at all, and do not admit them: the cache holds what was
            prefetched (decision 0004); decode calls above the gather limit (up to
            `GROUPED_LIMIT_ASSIGNMENTS` token-expert assignments) read each distinct expert
            once, in chunks (decision 0016). Needs a pinned store on CUDA (or a CPU pool).
        time_stalls: Measure stall time (two CUDA events per awaited copy on CUDA).
        drop_local_experts: Free each block's `LocalExperts` weights (replaced by empty tensors)
            so the model stops holding the experts: the point of offloading when the model was
            loaded whole. Build `store` first; afterwards `uninstall` is impossible and the
            model's state dict no longer carries expert weights.
        two_lanes: With `fetch="mapped"`: split each small call's misses between the GPU's
            mapped reads and a CPU lane that computes the rest from `store` at the same time
            (`two_lanes`; the rates are measured here, a few milliseconds). Each call shape
            takes the lane only where the cost model expects it to pay over the misses the
            cache's residency gives when the shape is first used (at S3 with FP8 experts 92%
            cached, none does: decode runs one lane).
        cpu_kernel: With `two_lanes`: the CPU expert kernel, `"auto"` (the fastest measured),
            `"torch"` or `"numba"`.
        lane_rates: With `two_lanes`: the split's rates as given (tests, what-if runs) instead
            of the measured ones (the CPU kernel is still chosen by measurement).
        handover: With `two_lanes`: how calls reach the CPU lane and come back (`lane_signals`):
            `"flags"` (host flags the stream writes and waits on), `"host_functions"` (CUDA host
            functions and semaphores) or `"auto"` (flags on CUDA where available).
        prefetcher: On-demand only: asked around every MoE layer call which experts of later
            layers to prefetch (e.g. `LookaheadPrefetcher(model)`), and between replayed
            decode steps (see `Prefetcher`); a prefetch never changes results.
        prefill: On-demand only: how calls too large for the gathered and grouped paths
            (prefill chunks; at least E token-expert assignments, `PrefillRing.takes`) treat
            their misses. `"admit"`: the copy path copies them into the cache (evicting
            others by the policy). `"stream"`: copied through a ring of staging slots of their
            own and computed there, while the held experts compute from their slots; none is
            admitted, so the cache keeps what decode and prefetches put there (decision 0018).
        prefill_ring_slots: With `prefill="stream"`: the ring's slots, allocated on the pool's
            device beside `pool` (`load_offloaded` takes them from the budget); default
            `ring_slots_for` the layout (8 at Qwen3-30B-A3B shapes).

    Raises:
        ValueError: no MoE blocks, a block missing from the store, mismatched layouts, an
            unknown `kind` or `fetch`, `fetch="mapped"` with a `cpu_compute_rule`, a shard
            store (`HostExpertStore.is_shard`) other than on demand with `fetch="copy"`,
            `two_lanes` without `fetch="mapped"` or with an unknown `cpu_kernel` or
            `handover`, a `prefetcher` for streaming, an unknown `prefill`, or
            `prefill="stream"` other than on demand, with a `cpu_compute_rule` or over a shard
            store.
        RuntimeError: `fetch="mapped"` where the GPU cannot read the store, or `two_lanes`
            where the host cannot signal the stream (the reason given).
    """
    blocks = model.moe_blocks()
    if not blocks:
        raise ValueError("the model has no MoE blocks to offload")
    missing = [b.layer for b in blocks if b.layer not in store.moe_layers]
    if missing:
        raise ValueError(f"the store lacks MoE layers {missing} (it has {store.moe_layers})")
    stats = OffloadStats()
    stalls = StallTimer(pool.device, enabled=time_stalls)
    executors: dict[int, ExpertExecutor] = {}
    cache: ExpertSlotCache | None = None
    ring: ExpertRing | None = None
    if fetch not in ("copy", "mapped"):
        raise ValueError(f"fetch must be 'copy' or 'mapped', got {fetch!r}")
    if fetch == "mapped" and cpu_compute_rule is not None:
        raise ValueError("fetch='mapped' reads misses on the GPU; it does not combine with a "
                         "cpu_compute_rule (use fetch='copy')")
    if two_lanes and (kind != "on_demand" or fetch != "mapped"):
        raise ValueError("two_lanes needs kind='on_demand' and fetch='mapped'")
    if handover not in HANDOVERS:
        raise ValueError(f"handover must be one of {', '.join(HANDOVERS)}, got {handover!r}")
    if store.is_shard and (kind != "on_demand" or fetch != "copy"):
        raise ValueError("a store holding a shard of the experts (expert parallelism) runs "
                         "only on demand with fetch='copy'")
    lanes: TwoLanes | None = None
    if prefetcher is not None and kind != "on_demand":
        raise ValueError("a prefetcher drives the on-demand cache; streaming fills its ring "
                         "from its own lookahead")
    if prefill not in PREFILL_MODES:
        raise ValueError(f"prefill must be 'admit' or 'stream', got {prefill!r}")
    streams = prefill == "stream"
    if streams and (kind != "on_demand" or cpu_compute_rule is not None or store.is_shard):
        raise ValueError("prefill='stream' needs kind='on_demand', no cpu_compute_rule and a "
                         "store holding every expert")
    prefill_ring: PrefillRing | None = None
    if kind == "on_demand":
        table = ResidencyTable(pool.num_slots, policy if policy is not None else LRUPolicy())
        cache = ExpertSlotCache(store, pool, engine, table, stats, stalls)
        cache.prefetcher = prefetcher
        fetcher = MappedFetcher(store, pool) if fetch == "mapped" else None
        if two_lanes:
            calibration = calibrate_lanes(store, pool, cpu_kernel)
            if lane_rates is not None:
                calibration = replace(calibration, rates=lane_rates)
            lanes = TwoLanes(store, pool, calibration, measure_round_trip=lane_rates is None,
                             top_k=blocks[0].spec.router.top_k, handover=handover,
                             absent_experts=cache.absent_experts)
            cache.cpu_lane = lanes.lane
            if lane_rates is None:  # given rates stay as given
                cache.on_cpu_lane_counts = lanes.observe
        if streams:
            prefill_ring = PrefillRing(cache, prefill_ring_slots)
        for block in blocks:
            executors[block.layer] = OffloadedExecutor(cache, block.layer, cpu_compute_rule,
                                                       fetcher, lanes, prefetcher, prefill_ring)
    elif kind == "streaming":
        if store.layout != pool.layout:
            raise ValueError(f"store layout {store.layout} differs from pool layout "
                             f"{pool.layout}")
        ring = ExpertRing(store, pool, engine, stats, stalls, resident, ring_size,
                          lookahead_min_share, max_group)
        for block in blocks:
            executors[block.layer] = StreamingExecutor(ring, block.layer)
    else:
        raise ValueError(f"kind must be 'on_demand' or 'streaming', got {kind!r}")
    for block in blocks:
        block.set_executor(executors[block.layer])
    if drop_local_experts:
        _drop_local_experts(blocks)
    return OffloadRuntime(kind, store, pool, engine, stats, executors, blocks, stalls, cache,
                          ring, drop_local_experts, engine.copy_seconds, lanes,
                          prefetcher=prefetcher, prefill_ring=prefill_ring)


def _drop_local_experts(blocks: list[MoEBlock]) -> None:
    """Replace each block's stacked expert weights by empty tensors (frees their memory)."""
    for block in blocks:
        for param in block.experts.parameters():
            param.data = torch.empty(0, dtype=param.dtype, device=param.device)
