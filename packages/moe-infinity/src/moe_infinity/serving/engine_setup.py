"""Building an engine from the command line's settings: the trace collection first (a bad
`--traces` file fails before the model loads), then the offloaded model, then the engine.
Shared by `moe-infinity serve` and `moe-infinity chat`.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

import torch
from moe_core import (
    ExpertId,
    ModelSpec,
    PrefetcherFactory,
    SettingError,
    cache_plan,
    check_device,
    resolve_model_path,
    run_dtype,
)

from moe_infinity.model_shape import ModelShape
from moe_infinity.serving.engine import Engine
from moe_infinity.serving.engine_config import EngineConfig
from moe_infinity.serving.expert_settings import ExpertSettings
from moe_infinity.serving.memory_plan import plan_memory
from moe_infinity.serving.rank_leader import RankLeader, shard_plan
from moe_infinity.serving.runtime_policy import ServePolicy
from moe_infinity.serving.serving_model import ServingModel, load_serving_model
from moe_infinity.serving.trace_keeper import TraceKeeper

__all__ = ["EngineSettings", "build_engine", "load_rank_model", "resolve_device"]


@dataclass(frozen=True, kw_only=True)
class EngineSettings:
    """Everything `build_engine` needs.

    Attributes:
        model: Checkpoint folder, hub id or `tiny-moe`.
        device: `cpu`, `cuda`, `cuda:1`, ...
        dtype: Model dtype name, or None for the workspace rule.
        gpu_memory_bytes: The whole device budget.
        kv_memory_bytes: The KV pool's share, or None for the default split.
        policy: The expert cache's eviction policy.
        traces: Trace collection file (loaded if present, saved at shutdown), or None.
        save_every: Requests between collection saves (0: only at shutdown).
        trace_capacity: Most EAMs a new collection holds.
        max_batch: Most running requests.
        max_queue: Most waiting requests.
        prefill_chunk: Most prompt tokens prefilled per step.
        prefetch: `none`, or `lookahead[:top=N]` (moe-core's `LookaheadPrefetcher`).
        experts: Dummy weights, truncation, fetch path and benchmark routing.
        rank_devices: One device per rank when the experts are spread over several
            (expert parallel, `--gpus`; `device` is rank 0's); empty: one process on `device`.
        graphs: Replay decode passes from CUDA graphs where possible (`--no-graphs`: eager).
        overlap: Enqueue the next decode pass before a step's host work where its rows are
            known (`EngineConfig.overlap`; benchmarks turn it off to compare).
    """

    model: str
    device: str
    dtype: str | None
    gpu_memory_bytes: int
    kv_memory_bytes: int | None
    policy: ServePolicy
    traces: Path | None
    save_every: int
    trace_capacity: int
    max_batch: int
    max_queue: int
    prefill_chunk: int
    prefetch: str = "none"
    experts: ExpertSettings = field(default_factory=ExpertSettings)
    rank_devices: tuple[str, ...] = ()
    graphs: bool = True
    overlap: bool = True


def resolve_device(device: str) -> str:
    """`auto` is the GPU where there is one, else the CPU; other names are checked."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    check_device(device)
    return device


def build_engine(settings: EngineSettings) -> Engine:
    """The engine (not started yet).

    Raises:
        MoEError: a bad setting, device, trace file or model, each before the work it guards.
    """
    if settings.trace_capacity <= 0:
        raise SettingError(f"--trace-capacity must be positive, got {settings.trace_capacity}")
    # Validated before anything loads (EngineConfig names the bad option).
    EngineConfig(max_batch=settings.max_batch, max_queue=settings.max_queue,
                 prefill_chunk=settings.prefill_chunk)
    experts = settings.experts
    spec = experts.spec_of(ModelSpec.from_pretrained(resolve_model_path(settings.model,
                                                                        weights=False)))
    prefetcher = cache_plan("lru", settings.prefetch, spec).prefetcher  # checked before loading
    keeper = TraceKeeper(ModelShape.from_spec(settings.model, spec), settings.traces,
                         settings.trace_capacity, settings.save_every)
    num_ranks = len(settings.rank_devices)
    if num_ranks > 1:  # a budget mistake fails here once, not on every rank
        plan_memory(spec, run_dtype(settings.dtype, torch.device(settings.device),
                                    spec.torch_dtype),
                    settings.gpu_memory_bytes, settings.max_batch, settings.kv_memory_bytes)
    ranks = (RankLeader.start(settings, shard_plan(spec, keeper.collection, num_ranks))
             if num_ranks > 1 else None)
    try:
        served = load_rank_model(settings, prefetcher, ranks.owned if ranks else None)
        if ranks is not None:
            ranks.attach(served)
        config = EngineConfig(max_batch=settings.max_batch, max_queue=settings.max_queue,
                              prefill_chunk=settings.prefill_chunk,
                              kv_bytes=served.memory.kv_bytes, graphs=settings.graphs,
                              overlap=settings.overlap)
        engine = Engine(served, config, keeper, followers=ranks,
                        routing=settings.experts.routing_context(served.model))
        if ranks is not None:
            ranks.ready(engine.pool)
    except BaseException:
        if ranks is not None:
            ranks.close()
        raise
    return engine


def load_rank_model(settings: EngineSettings, prefetcher: PrefetcherFactory | None,
                    experts: Collection[ExpertId] | None = None) -> ServingModel:
    """The served model on `settings.device`, holding only `experts` (a rank's shard; None:
    every expert). Every rank of an expert-parallel server loads through here, so all load
    the same dense model the same way."""
    return load_serving_model(settings.model, settings.device, settings.gpu_memory_bytes,
                              settings.policy, max_batch=settings.max_batch,
                              dtype=settings.dtype, kv_bytes=settings.kv_memory_bytes,
                              prefetcher=prefetcher, experts=settings.experts,
                              shard=experts)
