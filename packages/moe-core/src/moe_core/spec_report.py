"""A model's spec as a flat report: shape, parameter counts, and the memory each part needs.

This is what `moe-core inspect` prints; it answers "can this model run on my GPU, and how?"
before any weight is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from moe_core.dtypes import dtype_bytes, dtype_name, parse_dtype
from moe_core.errors import SettingError
from moe_core.spec import ModelSpec

__all__ = ["GpuFit", "gpu_fit", "spec_report"]

# Share of a GPU budget left for activations, KV cache and workspace when judging what fits.
_HEADROOM = 0.10


@dataclass(frozen=True)
class GpuFit:
    """How a model can run within a GPU memory budget.

    Attributes:
        mode: `"resident"` (everything fits), `"offload"` (dense part resident, some experts in
            GPU slots, the rest in host memory) or `"too_small"` (not even the dense part fits).
        budget_bytes: The GPU memory budget.
        usable_bytes: The budget less headroom for activations and KV cache.
        resident_experts: Routed experts that fit in GPU slots beside the dense part.
        total_experts: Routed experts in the model.
        host_bytes: Expert bytes that must live in host memory.
    """

    mode: Literal["resident", "offload", "too_small"]
    budget_bytes: int
    usable_bytes: int
    resident_experts: int
    total_experts: int
    host_bytes: int

    def describe(self) -> str:
        """One sentence for people."""
        if self.mode == "resident":
            return "fits on the GPU whole"
        if self.mode == "too_small":
            return "the dense part alone exceeds the budget: use a larger GPU budget"
        share = self.resident_experts / self.total_experts if self.total_experts else 0.0
        return (f"dense part resident; {self.resident_experts} of {self.total_experts} experts "
                f"({share:.0%}) fit in GPU slots, the rest stream from host memory")


def gpu_fit(spec: ModelSpec, dtype: str | torch.dtype, budget_bytes: int) -> GpuFit:
    """Judge how `spec` stored in `dtype` fits in a GPU budget of `budget_bytes`."""
    usable = int(budget_bytes * (1 - _HEADROOM))
    dense = spec.dense_bytes(dtype)
    total_experts = spec.moe.num_experts * spec.num_moe_layers
    if spec.total_bytes(dtype) <= usable:
        return GpuFit("resident", budget_bytes, usable, total_experts, total_experts, 0)
    if dense > usable:
        return GpuFit("too_small", budget_bytes, usable, 0, total_experts,
                      spec.routed_expert_bytes(dtype))
    fit = min(total_experts, (usable - dense) // spec.expert_bytes(dtype))
    return GpuFit("offload", budget_bytes, usable, fit, total_experts,
                  (total_experts - fit) * spec.expert_bytes(dtype))


def spec_report(spec: ModelSpec, dtype: str | torch.dtype = "bfloat16",
                gpu_memory_bytes: int | None = None,
                context_tokens: int = 4096) -> dict[str, object]:
    """Everything `inspect` shows, as one JSON-ready dict.

    Raises:
        SettingError: a negative GPU budget or a context of less than one token.
    """
    if context_tokens < 1:
        raise SettingError(f"context must be at least 1 token, got {context_tokens}")
    if gpu_memory_bytes is not None and gpu_memory_bytes < 0:
        raise SettingError(f"GPU memory must be non-negative, got {gpu_memory_bytes}")
    dtype = parse_dtype(dtype)
    att, moe = spec.attention, spec.moe
    report: dict[str, object] = {
        "architecture": spec.architecture,
        "model_type": spec.model_type,
        "num_layers": spec.num_layers,
        "moe_layers": list(spec.moe_layers),
        "dense_layers": list(spec.dense_layers),
        "hidden_size": spec.hidden_size,
        "vocab_size": spec.vocab_size,
        "attention": att.kind,
        "num_heads": att.num_heads,
        "num_kv_heads": att.num_kv_heads,
        "head_dim": att.head_dim,
        "kv_lora_rank": att.kv_lora_rank,
        "rope_theta": spec.rope.theta,
        "rope_scaling": spec.rope.scaling,
        "num_experts": moe.num_experts,
        "top_k": moe.router.top_k,
        "router": moe.router.method,
        "expert_intermediate_size": moe.expert_intermediate_size,
        "num_shared_experts": moe.num_shared_experts,
        "shared_intermediate_size": moe.shared_intermediate_size,
        "dense_intermediate_size": spec.dense_intermediate_size,
        "total_params": spec.total_params,
        "active_params_per_token": spec.active_params_per_token,
        "dtype": dtype_name(dtype),
        "expert_bytes": spec.expert_bytes(dtype),
        "routed_expert_bytes": spec.routed_expert_bytes(dtype),
        "dense_bytes": spec.dense_bytes(dtype),
        "total_bytes": spec.total_bytes(dtype),
        "kv_bytes_per_token": spec.kv_bytes_per_token(dtype),
        "context_tokens": context_tokens,
        "kv_bytes_per_sequence": spec.kv_bytes_per_token(dtype) * context_tokens,
        "activated_expert_bytes_per_token": (spec.num_moe_layers * moe.router.top_k
                                             * spec.expert_params * dtype_bytes(dtype)),
    }
    if gpu_memory_bytes is not None:
        fit = gpu_fit(spec, dtype, gpu_memory_bytes)
        report["gpu_memory_bytes"] = gpu_memory_bytes
        report["gpu_fit"] = fit.mode
        report["gpu_resident_experts"] = fit.resident_experts
        report["host_expert_bytes"] = fit.host_bytes
        report["gpu_fit_summary"] = fit.describe()
    return report
