"""How `--gpu-memory` is split: the dense weights, the KV pool, and the expert slots.

The budget is the whole device budget, as on a real smaller GPU (BENCHMARKS.md). The dense part
(attention, norms, embeddings, shared experts) must sit on the device whole. The KV pool gets
`--kv-memory` if given, else a quarter of what remains, but never more than `max_batch` full
contexts (more could never be used). The expert slots get the rest; the offload runtime caps
them at one slot per expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from moe_core import ModelSpec, SettingError, format_bytes

__all__ = ["MemoryPlan", "plan_memory"]

_KV_SHARE = 0.25


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes for each part.

    Attributes:
        dense_bytes: Weights that are not routed experts.
        kv_bytes: The KV pool.
        expert_bytes: Expert slots.
    """

    dense_bytes: int
    kv_bytes: int
    expert_bytes: int


def plan_memory(spec: ModelSpec, dtype: torch.dtype, budget_bytes: int, max_batch: int,
                kv_bytes: int | None = None) -> MemoryPlan:
    """Split `budget_bytes` for `spec` in `dtype`.

    Raises:
        SettingError: the dense weights and the KV pool leave nothing for experts.
    """
    dense = spec.dense_bytes(dtype)
    left = budget_bytes - dense
    if left <= 0:
        raise SettingError(f"--gpu-memory {format_bytes(budget_bytes)} does not hold the "
                           f"model's dense weights ({format_bytes(dense)})")
    useful_kv = max_batch * spec.max_position_embeddings * spec.kv_bytes_per_token(dtype)
    kv = kv_bytes if kv_bytes is not None else min(int(left * _KV_SHARE), useful_kv)
    experts = left - kv
    if experts <= 0:
        raise SettingError(f"--gpu-memory {format_bytes(budget_bytes)} leaves nothing for "
                           f"experts after the dense weights ({format_bytes(dense)}) and the "
                           f"KV pool ({format_bytes(kv)})")
    return MemoryPlan(dense, kv, experts)
