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
from moe_core.offload.host_store import HostExpertStore
from moe_core.offload.layout import ExpertLayout
from moe_core.offload.packed_store import PackedHeader, Progress, write_packed
from moe_core.spec import ModelSpec
from moe_core.staged_output import StagedOutput

__all__ = ["pack_model"]


def pack_model(model: str | Path, out: str | Path, *, dtype: str | torch.dtype | None = None,
               num_layers: int | None = None, dummy: bool = False, seed: int = 0,
               progress: Progress | None = None) -> PackedHeader:
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

    Raises:
        SettingError: a shipped shape without `dummy`, or a model without MoE layers.
        OutputError: `out` cannot be written, or another process is writing it.
        CheckpointError: missing or misshapen expert tensors.
    """
    if not dummy and str(model) in known_shapes():
        raise SettingError(f"{model} is a shipped shape without weights: pass --dummy (random "
                           f"experts) or a checkpoint folder")
    with StagedOutput(out, "store file"):  # write_packed writes <out>.partial and renames it
        return _pack(model, out, dtype, num_layers, dummy, seed, progress)


def _pack(model: str | Path, out: str | Path, dtype: str | torch.dtype | None,
          num_layers: int | None, dummy: bool, seed: int,
          progress: Progress | None) -> PackedHeader:
    folder = resolve_model_path(model, weights=not dummy)
    spec = ModelSpec.from_pretrained(folder)
    if num_layers is not None:
        spec = spec.truncated(num_layers)
    if not spec.moe_layers:
        raise SettingError(f"{model}: the model has no MoE layers to pack")
    storage = parse_dtype(dtype if dtype is not None else (spec.torch_dtype or "float32"))
    layout = ExpertLayout(spec.hidden_size, spec.moe.expert_intermediate_size, storage)
    num_experts = spec.moe.num_experts

    def arena_of(layer: int) -> torch.Tensor:
        if dummy:
            generator = torch.Generator().manual_seed(seed * 100_003 + layer)
            arena = torch.empty(num_experts * layout.numel, dtype=torch.float32)
            arena.normal_(0.0, spec.initializer_range, generator=generator)
            return arena.to(storage)
        store = HostExpertStore.from_checkpoint(folder, storage, pin=False,
                                                num_layers=num_layers, layers=[layer])
        return store.arena(layer)

    return write_packed(out, layout, list(spec.moe_layers), num_experts, arena_of,
                        source=str(model), progress=progress)
