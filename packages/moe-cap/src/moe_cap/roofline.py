"""Lower bounds on a step's time and the ceilings of tokens/s they imply.

A step cannot finish faster than its bytes take to cross GPU memory, its FLOPs take at the dense
peak, or its host-to-GPU copies take over PCIe:

    step_s >= max(bytes / memory_bandwidth, flops / peak_flops, h2d_bytes / pcie_bandwidth)

and so `tokens/s <= new tokens / step_s`. The bounds assume perfect overlap of the three; real
engines sit below them. With a GPU memory budget, routed experts that do not fit beside the dense
weights and the KV cache live in host memory; under uniform routing a step fetches the activated
experts in the share that is not resident.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from moe_core import ModelSpec

from moe_cap.errors import MoECapError
from moe_cap.hardware import GpuSpec, Peaks
from moe_cap.precision import storage_bytes
from moe_cap.step_cost import StepCost, decode_batch, prefill_batch, step_cost
from moe_cap.utilisation import PeakRates

__all__ = ["MetricsRow", "StepBounds", "host_expert_share", "metrics_sweep", "step_bounds"]

Limit = Literal["memory", "compute", "pcie"]


@dataclass(frozen=True)
class StepBounds:
    """Time bounds of one step and the throughput ceiling they imply.

    Attributes:
        num_tokens: New tokens the step runs.
        memory_s: Bytes over GPU memory bandwidth.
        compute_s: FLOPs over the dense peak.
        pcie_s: Host-to-GPU bytes over PCIe bandwidth.
    """

    num_tokens: int
    memory_s: float
    compute_s: float
    pcie_s: float

    @property
    def step_s(self) -> float:
        """The tightest bound: the largest of the three."""
        return max(self.memory_s, self.compute_s, self.pcie_s)

    @property
    def limit(self) -> Limit:
        """Which resource sets the bound."""
        times: dict[Limit, float] = {"memory": self.memory_s, "compute": self.compute_s,
                                     "pcie": self.pcie_s}
        return max(times, key=lambda k: times[k])

    @property
    def tokens_per_s(self) -> float:
        """Ceiling on new tokens per second."""
        return self.num_tokens / self.step_s


def step_bounds(cost: StepCost, peak: PeakRates, h2d_bytes: float = 0.0) -> StepBounds:
    """The time bounds of a step of cost `cost` on hardware of rates `peak`."""
    return StepBounds(cost.num_tokens, cost.bytes / peak.memory_bytes_per_s,
                      cost.flops / peak.flops_per_s,
                      0.0 if peak.pcie_bytes_per_s is None else h2d_bytes / peak.pcie_bytes_per_s)


def host_expert_share(spec: ModelSpec, gpu_memory_bytes: int, kv_bytes: int,
                      weight_dtype: str = "bf16", expert_dtype: str | None = None) -> float:
    """Share of the routed experts that live in host memory under a GPU memory budget.

    The dense weights and `kv_bytes` of KV cache stay on the GPU; the rest of the budget holds
    whole experts. 0.0 when everything fits.

    Raises:
        ValueError: the dense weights and the KV cache alone exceed the budget.
    """
    dense = storage_bytes(spec.dense_params, weight_dtype)
    free = gpu_memory_bytes - dense - kv_bytes
    if free < 0:
        raise MoECapError(f"the dense weights ({dense / 2**30:.2f} GiB) and KV cache "
                         f"({kv_bytes / 2**30:.2f} GiB) exceed the GPU memory budget "
                         f"({gpu_memory_bytes / 2**30:.2f} GiB)")
    total = spec.moe.num_experts * spec.num_moe_layers
    one = storage_bytes(spec.expert_params, expert_dtype or weight_dtype)
    return 1.0 - min(total, free // one) / total if total else 0.0


@dataclass(frozen=True)
class MetricsRow:
    """One line of `moe-cap metrics`: a phase at a batch size.

    Attributes:
        phase: `"prefill"` (`batch` prompts of `context` tokens) or `"decode"` (one token each
            for `batch` sequences with `context` cached).
        batch: Sequences in the step.
        context: Prompt length (prefill) or cached tokens (decode).
        cost: FLOPs and bytes of the step.
        h2d_bytes: Expert bytes fetched from host memory (0 without a GPU memory budget).
        bounds: Time bounds and the tokens/s ceiling.
    """

    phase: str
    batch: int
    context: int
    cost: StepCost
    h2d_bytes: float
    bounds: StepBounds

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return {"phase": self.phase, "batch": self.batch, "context": self.context,
                **self.cost.to_dict(), "h2d_bytes": self.h2d_bytes,
                "memory_bound_s": self.bounds.memory_s, "compute_bound_s": self.bounds.compute_s,
                "pcie_bound_s": self.bounds.pcie_s, "step_bound_s": self.bounds.step_s,
                "limit": self.bounds.limit, "tokens_per_s_ceiling": self.bounds.tokens_per_s}


def metrics_sweep(spec: ModelSpec, batches: Sequence[int], context: int, gpu: GpuSpec, *,
                  weight_dtype: str = "bf16", kv_dtype: str = "bf16",
                  expert_dtype: str | None = None, compute_dtype: str | None = None,
                  peaks: Peaks = "datasheet", gpu_memory_bytes: int | None = None,
                  ) -> list[MetricsRow]:
    """Prefill and decode steps at each batch size, with their bounds on `gpu`.

    Raises:
        HardwareError: `gpu` has no peak for the compute precision.
        ValueError: a batch size or context below 1, or a budget too small for the dense part.
    """
    if context < 1 or any(b < 1 for b in batches):
        raise MoECapError(f"batch sizes and context must be at least 1 (got {list(batches)}, "
                         f"{context})")
    peak = PeakRates.of(gpu, compute_dtype or weight_dtype, peaks)
    rows = []
    for batch in batches:
        kv_bytes = storage_bytes(batch * (context + 1) * spec.num_layers
                                 * spec.attention.kv_elements_per_token(), kv_dtype)
        share = 0.0 if gpu_memory_bytes is None else host_expert_share(
            spec, gpu_memory_bytes, kv_bytes, weight_dtype, expert_dtype)
        for phase, chunks in (("prefill", prefill_batch(batch, context)),
                              ("decode", decode_batch(batch, context))):
            cost = step_cost(spec, chunks, weight_dtype=weight_dtype, kv_dtype=kv_dtype,
                             expert_dtype=expert_dtype)
            h2d = cost.routed_expert_bytes * share
            rows.append(MetricsRow(phase, batch, context, cost, h2d,
                                   step_bounds(cost, peak, h2d)))
    return rows
