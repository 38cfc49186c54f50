"""Dummy routed experts for the moe-gen benchmarks: host stores of real shapes filled with tiled
uniform noise (bf16 or the run dtype), or with noise quantised to FP8 (e4m3 weights and their
real per-channel scales, as `moe-core pack --expert-dtype fp8` writes them).

Drawing tens of billions of random numbers on the host would take minutes and speed does not
depend on the values, so one block of noise is drawn and tiled into every arena; it is never
all zeros (../shared/BENCHMARKS.md).
"""

from __future__ import annotations

import torch
from moe_core import FP8, ExpertLayout, HostExpertStore, ModelSpec

__all__ = ["dummy_store", "fp8_noise_experts", "noise", "tile_into"]

_NOISE = 32 << 20  # elements of the one noise block


def noise(numel: int = _NOISE) -> torch.Tensor:
    """One block of uniform bf16 noise in [-0.02, 0.02] (seeded: the same every run)."""
    return torch.empty(numel, dtype=torch.bfloat16).uniform_(
        -0.02, 0.02, generator=torch.Generator().manual_seed(0))


def tile_into(flat: torch.Tensor, block: torch.Tensor) -> None:
    """Fill the 1-D `flat` with copies of `block` (converted to its dtype), the last one cut."""
    for start in range(0, flat.numel(), block.numel()):
        chunk = flat[start : start + block.numel()]
        chunk.copy_(block[: chunk.numel()].to(chunk.dtype))


def fp8_noise_experts(layout: ExpertLayout, max_experts: int) -> torch.Tensor:
    """Whole FP8 blocks of `layout` (up to `max_experts`, at most one noise block's worth of
    weights, at least one expert): noise quantised per output channel by the store's own
    packing, so the scales are real. 1-D, `count * layout.numel` bytes."""
    if not layout.is_fp8:
        raise ValueError(f"an FP8 layout is needed, got {layout.dtype}")
    wide = ExpertLayout(layout.hidden_size, layout.intermediate_size, torch.bfloat16)
    count = max(1, min(max_experts, _NOISE // wide.numel))
    source = noise(count * wide.numel).view(count, wide.numel)  # [count, 3 * I * D]
    out = torch.empty(count, layout.numel, dtype=FP8)
    layout.pack_layer(*wide.stacked_views(source), out)
    return out.view(-1)


def dummy_store(spec: ModelSpec, dtype: torch.dtype, pin: bool, fp8: bool = False
                ) -> HostExpertStore:
    """A host store (pinned with `pin`) of random experts for `spec`: in `dtype`, or FP8
    blocks with their scales when `fp8` (whole blocks tiled, so every block is a valid one)."""
    store_dtype = FP8 if fp8 else dtype
    layout = ExpertLayout(spec.hidden_size, spec.moe.expert_intermediate_size, store_dtype)
    store = HostExpertStore.empty(layout, spec.moe_layers, spec.moe.num_experts, pin)
    block = fp8_noise_experts(layout, spec.moe.num_experts) if fp8 else noise()
    for layer in spec.moe_layers:
        tile_into(store.arena(layer), block)
    return store
