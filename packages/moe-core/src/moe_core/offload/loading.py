"""`load_offloaded`: a model whose dense part sits on the compute device and whose routed experts
live in host memory, served through GPU slots sized from a memory budget. The one call the CLIs
and engines use to run a model larger than the GPU.

Experts may be held as FP8 (`expert_dtype="fp8"`, or a store file packed with FP8): e4m3 with a
scale per output channel, half of bf16's bytes in host memory, over PCIe, in the CPU lane's reads
and in the slots, which then cache about twice the experts (decision 0015). Never silent: the
runtime's store says so (`runtime.store.layout.is_fp8`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_core.dtypes import run_dtype
from moe_core.errors import SettingError
from moe_core.expert_id import ExpertId
from moe_core.loader import load_model, resolve_model_path
from moe_core.model import MoEForCausalLM
from moe_core.offload.copy_engines import make_copy_engine
from moe_core.offload.fp8 import FP8
from moe_core.offload.gpu_slots import GpuSlotPool
from moe_core.offload.host_store import HostExpertStore
from moe_core.offload.packed_store import PackedHeader, read_header
from moe_core.offload.policy import EvictionPolicy
from moe_core.offload.prefetcher import Prefetcher
from moe_core.offload.prefill_ring import PREFILL_MODES, PrefillMode, ring_slots_for
from moe_core.offload.runtime import FetchMode, OffloadKind, OffloadRuntime, install_offloading
from moe_core.sizes import format_bytes
from moe_core.spec import ModelSpec

__all__ = ["OffloadedModel", "check_fetch_lanes", "dense_bytes", "fits_on_device",
           "load_offloaded"]


@dataclass
class OffloadedModel:
    """What `load_offloaded` built.

    Attributes:
        model: The model; its MoE blocks run through `runtime`.
        runtime: Store, slots, copy engine, counters.
        store_seconds: Time spent building or reading the host store.
    """

    model: MoEForCausalLM
    runtime: OffloadRuntime
    store_seconds: float


def dense_bytes(model: MoEForCausalLM) -> int:
    """Bytes of every parameter that is not a routed expert (tied weights counted once)."""
    expert = {id(p) for block in model.moe_blocks() for p in block.experts.parameters()}
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in expert or id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    return total


def load_offloaded(model: str | Path, device: str | torch.device, expert_memory_bytes: int, *,
                   dtype: str | torch.dtype | None = None, store: str | Path | None = None,
                   policy: EvictionPolicy | None = None, kind: OffloadKind = "on_demand",
                   resident: list[ExpertId] | None = None, fetch: FetchMode = "copy",
                   dummy: bool = False, num_layers: int | None = None,
                   verify_store: bool = True, two_lanes: bool = False, cpu_kernel: str = "auto",
                   prefetcher: Callable[[MoEForCausalLM], Prefetcher] | None = None,
                   experts: Collection[ExpertId] | None = None,
                   expert_dtype: str | torch.dtype | None = None,
                   prefill: PrefillMode = "admit") -> OffloadedModel:
    """Load `model` with its routed experts offloaded to host memory.

    Args:
        model: Checkpoint folder, hub id, known shape (with `dummy`) or `tiny-moe`.
        device: Where compute runs (`"cuda"`; `"cpu"` works too, for tests).
        expert_memory_bytes: Device memory for expert slots (the rest of a budget goes to the
            dense part, KV cache and activations: the caller decides the split).
        dtype: Model dtype; default: `run_dtype`'s rule for `device` (float32 on the CPU, else
            the checkpoint's).
        store: A store file from `moe-core pack` to read the experts from (fast start; experts
            stored in another dtype are converted to the model's, and FP8 ones stay FP8);
            default: pack them from the checkpoint's shards (or the dummy weights) now.
        policy: Eviction policy (on-demand); default LRU.
        kind: `"on_demand"` or `"streaming"`.
        resident: Streaming: experts kept resident. On-demand with `fetch="mapped"`: experts
            loaded into the slots up front (default: as many as fit, in layer order); the
            mapped path reads every other expert from host memory and admits none.
        fetch: On-demand only: `"copy"` (misses copied into slots, cached by the policy) or
            `"mapped"` (decode reads misses from pinned host memory on the GPU, no host
            synchronisation per layer; see `install_offloading`).
        dummy: Random weights from `config.json`. On the CPU, or where the whole model does not
            fit the GPU's free memory, or for a shard (`experts`), drawn on the host: the model
            then equals `load_model(model, "cpu", dtype, dummy=True)`. Otherwise on the GPU (seconds
            where the host takes minutes for tens of GB; other values, the same shapes), the
            experts then moved to host memory and their device copies freed.
        num_layers: Keep only the first `num_layers` decoder layers.
        verify_store: Check each expert block of `store` against its checksum as it is read
            (False skips the check: faster when the file is in the page cache).
        two_lanes: With `fetch="mapped"`: decode splits each layer's misses between the GPU's
            reads over PCIe and the CPU, which computes its share from the host store at the
            same time (see `install_offloading`).
        cpu_kernel: With `two_lanes`: `"auto"`, `"torch"` or `"numba"`.
        prefetcher: On-demand only: builds the prefetcher for the loaded model (e.g.
            `LookaheadPrefetcher`, the class itself; see `install_offloading`).
        experts: Hold only these routed experts in host memory and the slots (an
            expert-parallel rank's shard, `moe_core.parallel`); on demand with
            `fetch="copy"` only. Default: every expert.
        expert_dtype: `"fp8"` (or `FP8`): hold the routed experts as e4m3 with a scale per
            output channel (half of bf16's bytes in host memory, over PCIe and in the slots;
            dequantised just before the products), quantised here from the checkpoint, the dummy
            weights or a 16-bit store file; None: the model dtype (a store file's FP8 experts
            stay FP8). From a checkpoint the experts are read in the model dtype first, so the
            host holds both for a moment.
        prefill: On-demand only: `"admit"` (prefill chunks copy their misses into the cache,
            evicting others) or `"stream"` (they stream them through a small ring of staging
            slots at the link's rate and admit none; the ring's slots, 8 at Qwen3-30B-A3B
            shapes, come out of `expert_memory_bytes`; see `install_offloading`).

    Raises:
        ValueError: the budget cannot hold the slots the executor needs, the store file does
            not match the model, `expert_dtype` is neither None nor FP8, or `prefill` is
            unknown or `"stream"` for streaming or a shard (`experts`).
        CheckpointError / ConfigError: as `load_model` and `HostExpertStore.from_packed` (a
            damaged store file included).
    """
    device = torch.device(device)
    fp8 = _fp8_experts(expert_dtype)
    _check_prefill(prefill, kind, experts)
    # Resolved here, for `device`: the dummy model is drawn on the host, and the experts are
    # packed apart from the dense part, and both must end up in the same dtype.
    dtype = run_dtype(dtype, device, ModelSpec.from_pretrained(model).torch_dtype)
    started = time.perf_counter()
    if store is not None:
        header = read_header(store)  # fail fast, before loading anything
        net = load_model(model, device, dtype, dummy=dummy, num_layers=num_layers,
                         load_experts=False)
        _check_store_matches(header, net, store)
        host = HostExpertStore.from_packed(store, verify=verify_store)
        if not header.layout.is_fp8:  # 16-bit experts: quantised from the file's own values
            host = host.to_dtype(FP8 if fp8 else dtype)
        if experts is not None:  # the file holds every expert; keep the shard's
            host = host.subset(experts)
    elif dummy:
        # Drawn where it is fast (the GPU, when the whole model fits there for a moment), its
        # experts packed into host memory, then freed, and the dense rest on the device.
        # (a shard's rank draws on the host, as every rank then does: the same weights on all)
        on_device = experts is None and fits_on_device(model, device, dtype, num_layers)
        drawn_on = device if on_device else torch.device("cpu")
        net = load_model(model, drawn_on, dtype, dummy=True, num_layers=num_layers)
        host = HostExpertStore.from_model(net, FP8 if fp8 else None, experts=experts)
        for block in net.moe_blocks():
            for param in block.experts.parameters():
                param.data = torch.empty(0, dtype=param.dtype, device=param.device)
        net.to(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    else:
        host = HostExpertStore.from_checkpoint(resolve_model_path(model), dtype,
                                               num_layers=num_layers, experts=experts)
        if fp8:
            host = host.to_dtype(FP8)
        net = load_model(model, device, dtype, num_layers=num_layers, load_experts=False)
    store_seconds = time.perf_counter() - started
    layout = host.layout
    top_k = net.spec.moe.router.top_k
    # A layer's call pins at most top_k experts, or all a shard holds of that layer.
    most_held = max(len(host.held(layer)) for layer in host.moe_layers)
    needed = min(top_k, most_held) if kind == "on_demand" else 2 + len(resident or [])
    # The prefill ring's slots come out of the budget (the cache gets the rest).
    ring_slots = ring_slots_for(layout) if prefill == "stream" else 0
    if ring_slots and expert_memory_bytes < (ring_slots + needed) * layout.nbytes:
        raise SettingError(f"{format_bytes(expert_memory_bytes)} of expert memory cannot hold "
                           f"a prefill ring of {ring_slots} expert slots of "
                           f"{format_bytes(layout.nbytes)} and the {needed} the {kind} "
                           f"executor needs")
    pool = GpuSlotPool.for_budget(layout, expert_memory_bytes - ring_slots * layout.nbytes,
                                  device,
                                  max_slots=len(host.experts()) + (2 if kind == "streaming" else 0))
    if pool.num_slots < needed:
        raise SettingError(f"{format_bytes(expert_memory_bytes)} of expert memory holds "
                         f"{pool.num_slots} expert slots of {format_bytes(layout.nbytes)}; the "
                         f"{kind} executor needs at least {needed}")
    mapped = kind == "on_demand" and fetch == "mapped"
    if two_lanes and not mapped:
        raise SettingError("two-lane decode needs on-demand offloading with the mapped fetch "
                           "(--fetch mapped)")
    runtime = install_offloading(net, host, pool, make_copy_engine(device), policy, kind,
                                 resident=() if mapped else resident or (), fetch=fetch,
                                 two_lanes=two_lanes, cpu_kernel=cpu_kernel,
                                 prefetcher=prefetcher(net) if prefetcher is not None else None,
                                 prefill=prefill, prefill_ring_slots=ring_slots or None)
    if mapped:  # the cache holds what is loaded now (misses are not admitted)
        runtime.prefetch((resident or host.experts())[: pool.num_slots])
        runtime.drain()
    return OffloadedModel(net, runtime, store_seconds)


def _fp8_experts(expert_dtype: str | torch.dtype | None) -> bool:
    """Whether `expert_dtype` asks for FP8 experts.

    Raises:
        SettingError: anything but None, `"fp8"` or `FP8`.
    """
    if expert_dtype is None:
        return False
    if expert_dtype in ("fp8", FP8):
        return True
    raise SettingError(f"expert_dtype must be fp8 (or None: the model dtype), got "
                       f"{expert_dtype!r}")


def _check_prefill(prefill: str, kind: OffloadKind,
                   experts: Collection[ExpertId] | None) -> None:
    """Refuse a `prefill` mode `load_offloaded` cannot run.

    Raises:
        SettingError: an unknown mode, or `"stream"` for streaming or a shard.
    """
    if prefill not in PREFILL_MODES:
        raise SettingError(f"prefill must be admit or stream, got {prefill!r}")
    if prefill == "stream" and (kind != "on_demand" or experts is not None):
        raise SettingError("prefill='stream' needs on-demand offloading of every expert (not "
                           "streaming, not an expert-parallel shard)")


def check_fetch_lanes(fetch: str, lanes: int, lanes_need: str = "--fetch mapped") -> None:
    """The fetch path and lane count as a command takes them (`--fetch`, `--lanes`).

    Args:
        lanes_need: What `--lanes 2` needs, as the command's error names it.

    Raises:
        SettingError: an unknown fetch or lane count, or two lanes without the mapped fetch.
    """
    if fetch not in ("copy", "mapped"):
        raise SettingError(f"--fetch must be copy or mapped, got {fetch!r}")
    if lanes not in (1, 2):
        raise SettingError(f"--lanes must be 1 or 2, got {lanes}")
    if lanes == 2 and fetch != "mapped":
        raise SettingError(f"--lanes 2 needs {lanes_need}")


def fits_on_device(model: str | Path, device: torch.device, dtype: torch.dtype,
                   num_layers: int | None = None) -> bool:
    """Whether the whole model (experts too) fits in 90% of `device`'s free memory (a GPU; never
    on the CPU): where dummy weights can be drawn in seconds rather than minutes."""
    if device.type != "cuda":
        return False
    spec = ModelSpec.from_pretrained(model)
    if num_layers is not None and num_layers < spec.num_layers:
        spec = spec.truncated(num_layers)
    free, _ = torch.cuda.mem_get_info(device)
    return spec.total_bytes(dtype) <= 0.9 * free


def _check_store_matches(header: PackedHeader, net: MoEForCausalLM, path: str | Path) -> None:
    spec = net.spec
    expected = (spec.hidden_size, spec.moe.expert_intermediate_size, spec.moe.num_experts)
    got = (header.hidden_size, header.intermediate_size, header.num_experts)
    missing = [layer for layer in spec.moe_layers if layer not in header.moe_layers]
    if got != expected or missing:
        raise SettingError(f"{path}: the store holds experts of shape (hidden, width, experts) "
                         f"{got} for layers {list(header.moe_layers)}; the model needs "
                         f"{expected} for layers {list(spec.moe_layers)}")
