"""`pack_model`: write a model's routed experts into a store file, one layer in memory at a time
(what `moe-core pack` runs).

Peak host memory while packing is one layer's arena (plus the memory-mapped shards' pages the
kernel keeps cached), not the whole store, so a machine can pack a model larger than its RAM.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moe_core.dtypes import parse_dtype
from moe_core.errors import SettingError
from moe_core.known_shapes import known_shapes
from moe_core.loader import resolve_model_path
from moe_core.offload.fp8 import FP8
from moe_core.offload.host_store import HostExpertStore
from moe_core.offload.layout import ExpertLayout
from moe_core.offload.packed_store import PackedHeader, Progress, write_packed
from moe_core.spec import ModelSpec
from moe_core.staged_output import StagedOutput

__all__ = ["pack_model"]


def pack_model(model: str | Path, out: str | Path, *, dtype: str | torch.dtype | None = None,
               num_layers: int | None = None, dummy: bool = False, seed: int = 0,
               progress: Progress | None = None, expert_dtype: str | None = None
               ) -> PackedHeader:
    """Write every routed expert of `model` into the store file `out`.

    Args:
        model: Checkpoint folder, hub id, known shape or `tiny-moe`.
        out: The store file to write.
        dtype: Storage dtype; default: the checkpoint's.
        num_layers: Keep only the MoE layers among the first `num_layers` decoder layers.
        dummy: Random experts from `config.json` alone (N(0, initializer_range), seeded per
            layer), e.g. for benchmarks on known shapes; not the same draws as
            `load_model(dummy=True)`.
        seed: Seed of the dummy experts.
        progress: `progress(done_bytes, total_bytes)`.
        expert_dtype: `"fp8"`: quantise the experts to e4m3 with a float32 scale per output
            channel (`fp8.py`; read from the checkpoint in `dtype` first); None: store `dtype`.

    Raises:
        SettingError: a shipped shape without `dummy`, a model without MoE layers, or an
            unknown `expert_dtype`.
        OutputError: `out` cannot be written, or another process is writing it.
        CheckpointError: missing or misshapen expert tensors.
    """
    if not dummy and str(model) in known_shapes():
        raise SettingError(f"{model} is a shipped shape without weights: pass --dummy (random "
                           f"experts) or a checkpoint folder")
    if expert_dtype not in (None, "fp8"):
        raise SettingError(f"unknown expert dtype {expert_dtype!r}: the only one is fp8 (omit it "
                           f"to store the experts in --dtype)")
    with StagedOutput(out, "store file"):  # write_packed writes <out>.partial and renames it
        return _pack(model, out, dtype, num_layers, dummy, seed, progress,
                     expert_dtype == "fp8")


def _pack(model: str | Path, out: str | Path, dtype: str | torch.dtype | None,
          num_layers: int | None, dummy: bool, seed: int,
          progress: Progress | None, fp8: bool) -> PackedHeader:
    folder = resolve_model_path(model, weights=not dummy)
    spec = ModelSpec.from_pretrained(folder)
    if num_layers is not None:
        spec = spec.truncated(num_layers)
    if not spec.moe_layers:
        raise SettingError(f"{model}: the model has no MoE layers to pack")
    storage = parse_dtype(dtype if dtype is not None else (spec.torch_dtype or "float32"))
    layout = ExpertLayout(spec.hidden_size, spec.moe.expert_intermediate_size, storage)
    num_experts = spec.moe.num_experts

    stored = ExpertLayout(layout.hidden_size, layout.intermediate_size, FP8) if fp8 else layout

    def arena_of(layer: int) -> torch.Tensor:
        arena = source_arena(layer)
        if not fp8:
            return arena
        quantised = torch.empty(num_experts * stored.numel, dtype=FP8)  # one layer at a time
        stored.pack_layer(*layout.stacked_views(arena.view(num_experts, layout.numel)),
                          quantised.view(num_experts, stored.numel))
        return quantised

    def source_arena(layer: int) -> torch.Tensor:
        if dummy:
            generator = torch.Generator().manual_seed(seed * 100_003 + layer)
            arena = torch.empty(num_experts * layout.numel, dtype=torch.float32)
            arena.normal_(0.0, spec.initializer_range, generator=generator)
            return arena.to(storage)
        store = HostExpertStore.from_checkpoint(folder, storage, pin=False,
                                                num_layers=num_layers, layers=[layer])
        return store.arena(layer)

    return write_packed(out, stored, list(spec.moe_layers), num_experts, arena_of,
                        source=str(model), progress=progress)
