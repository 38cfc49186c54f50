"""The engine's sizing: what the planner chooses and what the engine obeys."""

from __future__ import annotations

from dataclasses import asdict, dataclass

__all__ = ["HostMemory", "Plan", "Prediction"]


@dataclass(frozen=True)
class Prediction:
    """The cost model's view of one decode step of a plan (seconds unless named otherwise).

    Attributes:
        step_s: Predicted decode step time.
        pcie_s: Host-to-device copies: streamed experts plus the KV of every micro-batch.
        expert_pcie_s: The streamed-expert part of `pcie_s`.
        kv_pcie_s: The KV part of `pcie_s`.
        gpu_s: Device compute: expert matrix products, attention, dense projections.
        cpu_s: Host work on the critical path: gathering KV pages into staging.
        bound_s: The physical bound of a step: bytes that must cross PCIe over the measured
            bandwidth, or the FLOPs over the measured matmul rate, whichever is larger.
        tokens_per_s: Predicted decode tokens per second (`batch / step_s`).
        bound_tokens_per_s: Decode tokens per second at the bound.
        dispatch_s: The main thread's dispatch work (issuing every operation and copy of the
            step); a layer takes at least its share of it.
    """

    step_s: float
    pcie_s: float
    expert_pcie_s: float
    kv_pcie_s: float
    gpu_s: float
    cpu_s: float
    bound_s: float
    tokens_per_s: float
    bound_tokens_per_s: float
    dispatch_s: float = 0.0

    def to_dict(self) -> dict[str, float]:
        """JSON-ready."""
        return asdict(self)


@dataclass(frozen=True)
class HostMemory:
    """Host memory of a plan (bytes).

    Attributes:
        experts: The expert store (every routed expert, in its storage dtype).
        kv_pages: The KV cache: `B x (prompt + limit)` tokens of pages.
        staging: The KV mover's pinned staging buffers (two per gather in flight, each up to a
            micro-batch's keys of one cached tensor of one layer).
        host_attention: The host's copies of every layer's attention weights (share > 0).
        loading: While loading: the whole model in the run dtype plus one layer of the store
            (moe-gen packs a layer at a time and frees its weights from the model at once).
    """

    experts: int
    kv_pages: int
    staging: int
    host_attention: int
    loading: int

    @property
    def running(self) -> int:
        """While generating."""
        return self.experts + self.kv_pages + self.staging + self.host_attention

    @property
    def peak(self) -> int:
        """The larger of loading and generating."""
        return max(self.running, self.loading)


    def to_dict(self) -> dict[str, int]:
        """JSON-ready, with the running and peak totals."""
        return {**asdict(self), "running": self.running, "peak": self.peak}


@dataclass(frozen=True)
class Plan:
    """Batch sizes and memory split of a run.

    Attributes:
        max_batch_size: B, sequences carried through each layer per step.
        micro_batch_size: Sequences per attention micro-batch.
        max_prefill_tokens: Prompt tokens admitted per step (bounds prefill activations).
        page_tokens: Tokens per KV page.
        num_kv_pages: Pages of the host KV cache.
        num_resident_experts: Routed experts kept in GPU slots for good (spread evenly over the
            MoE layers); the rest stream through the ring.
        ring_size: Streaming ring slots.
        max_attention_pairs: Query-key pairs one attention micro-batch may hold (sequences x
            new tokens x keys): prefill micro-batches (hundreds of queries per sequence) get
            fewer sequences, so their score matrices fit where a decode micro-batch's KV does.
        cpu_attention_share: Share of each decode step's sequences attended on the host (their
            KV never crosses PCIe).
        host_attention_kernel: How the host attends its share: `"torch"` (the modules' own
            CPU path) or `"numba"` (the paged kernel reading the pages in place), whichever the
            profile measured faster.
        kv_lookahead: Micro-batches whose KV may be gathered to the device before their
            attention runs (the copies overlap the previous layer's expert stream; each holds
            device memory until attended).
        kv_gather: Who gathers the past KV of the device's micro-batches: `"staged"` (a host
            thread into pinned staging, then one copy per gather) or `"mapped"` (the GPU reads
            the pinned pages itself; no staging), whichever the cost model predicts faster;
            `"auto"` (plans not made by the planner) takes `"mapped"` where the device can read
            the pages (a CUDA GPU with CuPy), else `"staged"`.
        offload: Whether routed experts run through the streaming executor at all (False:
            every expert stays in the model, the all-resident case).
        prediction: The cost model's prediction, when a planner made the plan.
        host_memory: The planner's host memory of the plan (its peak within `--host-memory`).
    """

    max_batch_size: int
    micro_batch_size: int
    max_prefill_tokens: int
    page_tokens: int
    num_kv_pages: int
    num_resident_experts: int = 0
    ring_size: int = 2
    max_attention_pairs: int = 1 << 62
    cpu_attention_share: float = 0.0
    host_attention_kernel: str = "torch"
    kv_lookahead: int = 2
    kv_gather: str = "auto"
    offload: bool = True
    prediction: Prediction | None = None
    host_memory: HostMemory | None = None

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "micro_batch_size", "max_prefill_tokens", "page_tokens",
                     "num_kv_pages", "max_attention_pairs", "kv_lookahead"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Plan.{name} must be positive, got {getattr(self, name)}")
        if self.num_resident_experts < 0:
            raise ValueError(f"Plan.num_resident_experts must be >= 0, got "
                             f"{self.num_resident_experts}")
        if not 0.0 <= self.cpu_attention_share <= 1.0:
            raise ValueError(f"Plan.cpu_attention_share must be in [0, 1], got "
                             f"{self.cpu_attention_share}")
        if self.host_attention_kernel not in ("torch", "numba"):
            raise ValueError(f"Plan.host_attention_kernel must be 'torch' or 'numba', got "
                             f"{self.host_attention_kernel!r}")
        if self.kv_gather not in ("auto", "staged", "mapped"):
            raise ValueError(f"Plan.kv_gather must be 'auto', 'staged' or 'mapped', got "
                             f"{self.kv_gather!r}")
        if self.ring_size < 2:
            raise ValueError(f"Plan.ring_size must be at least 2, got {self.ring_size}")

    def to_dict(self) -> dict[str, object]:
        """JSON-ready (the prediction nested)."""
        out: dict[str, object] = {k: v for k, v in asdict(self).items()
                                  if k not in ("prediction", "host_memory")}
        out["prediction"] = None if self.prediction is None else self.prediction.to_dict()
        out["host_memory"] = None if self.host_memory is None else self.host_memory.to_dict()
        return out
