"""The planner: search batch size, micro-batch size and resident experts for the plan the cost
model predicts fastest, within the GPU and host memory budgets.

Larger B amortises every streamed expert over more tokens but grows the KV traffic and the host
KV cache linearly; larger micro-batches cost device memory that resident experts could use. The
search is small (powers of two), so it is exhaustive.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from moe_core import ModelSpec, SettingError, format_bytes

from moe_gen.cost_model import (
    Candidate,
    ModelCosts,
    gpu_bytes,
    host_memory,
    kv_lookahead,
    predict,
)
from moe_gen.plan import Plan, Prediction
from moe_gen.profile import DeviceProfile

__all__ = ["Budget", "make_plan"]

_RINGS = (2, 4, 8, 16, 32, 64)
_PAGE_TOKENS = 16
_MAX_BATCH = 4096
_MAX_PREFILL_TOKENS = 8192
_CPU_SHARES = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75)
# Device bytes per query-key pair of a prefill micro-batch where attention materialises its scores
# (float32 scores, the softmax, and slack for the expanded keys): caps its sequences.
_SCORE_BYTES = 16
# Host attention must beat the best device-only plan by this factor: its rate is the least
# certain input (on the H200 host a 1/4 share ran ~4x slower than the profile said, and the
# profile itself varied 20x between two runs), and a wrong guess costs the whole step.
_HOST_SHARE_MARGIN = 1.05
# Predictions this close count as a tie (many plans reach the same PCIe bound).
_TIE = 0.005


@dataclass(frozen=True, kw_only=True)
class Budget:
    """What the plan must fit in.

    Attributes:
        gpu_bytes: The whole process's device memory (weights, slots, KV work, activations).
        host_bytes: Host memory for the expert store and the KV pages.
        prompt_tokens: Longest prompt expected.
        max_new_tokens: Longest generation expected.
        num_requests: Requests in the job (no point in a batch larger).
        reserve_bytes: Device memory kept free for the allocator and kernels' workspace.
        max_cpu_attention_share: The most of a decode batch the host may attend (0: never).
    """

    gpu_bytes: int
    host_bytes: int
    prompt_tokens: int
    max_new_tokens: int
    num_requests: int = _MAX_BATCH
    reserve_bytes: int = 0
    max_cpu_attention_share: float = 0.75

    def __post_init__(self) -> None:
        for name in ("gpu_bytes", "host_bytes", "prompt_tokens", "max_new_tokens",
                     "num_requests"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Budget.{name} must be positive, got {getattr(self, name)}")


def _powers(limit: int) -> list[int]:
    out, n = [], 1
    while n <= limit:
        out.append(n)
        n *= 2
    return out if out[-1] == limit else [*out, limit]


def _candidates(costs: ModelCosts, budget: Budget, context: int) -> list[Candidate]:
    """Every feasible candidate, each with as many resident experts as its memory leaves."""
    max_tokens = budget.prompt_tokens + budget.max_new_tokens
    found = []
    for batch in _powers(min(_MAX_BATCH, budget.num_requests)):
        if host_memory(costs, Candidate(batch, 1, 0, 1), max_tokens).running > budget.host_bytes:
            break  # the KV pages alone outgrow the host budget
        prefill = max(budget.prompt_tokens, min(_MAX_PREFILL_TOKENS, batch * budget.prompt_tokens))
        for micro in _powers(min(batch, 256)):
            for ring in _RINGS:
                base = Candidate(batch, micro, 0, prefill, ring=ring)
                free = (budget.gpu_bytes - budget.reserve_bytes
                        - gpu_bytes(costs, base, context, max_tokens))
                if free < 0:
                    continue
                resident = min(free // costs.expert_bytes, costs.num_experts)
                candidate = replace(base, num_resident=int(resident))
                if host_memory(costs, candidate, max_tokens).running <= budget.host_bytes:
                    found.append(candidate)
    return found


def _best(scored: list[tuple[Prediction, Candidate]]) -> tuple[Prediction, Candidate]:
    """The fastest prediction; among those within `_TIE` of it, the least host dispatch work
    (slack for a host the cost model knows least), then the smaller batch, then the smaller
    ring (its slots go to resident experts)."""
    fastest = max(p.tokens_per_s for p, _ in scored)
    close = [pc for pc in scored if pc[0].tokens_per_s >= (1 - _TIE) * fastest]
    return min(close, key=lambda pc: (pc[0].dispatch_s, pc[1].batch, pc[1].ring))


def make_plan(spec: ModelSpec, dtype: torch.dtype, profile: DeviceProfile, budget: Budget,
              fp8_experts: bool = False) -> Plan:
    """The plan with the highest predicted decode tokens/s (with `fp8_experts`, for routed
    experts stored and streamed as FP8).

    Raises:
        SettingError: nothing fits (the message says what the dense part and one slot need).
    """
    costs = ModelCosts.of(spec, dtype, fp8_experts)
    context = budget.prompt_tokens + budget.max_new_tokens // 2  # mean over a generation
    max_tokens = budget.prompt_tokens + budget.max_new_tokens
    loading = host_memory(costs, Candidate(1, 1, 0, 1), max_tokens).loading
    if loading > budget.host_bytes:
        raise SettingError(f"loading the model takes {format_bytes(loading)} of host memory (the "
                           f"model in {dtype} plus one layer of its expert store), more than the "
                           f"host budget {format_bytes(budget.host_bytes)}: raise --host-memory")
    found = _candidates(costs, budget, context)
    if not found:
        need = costs.dense_bytes + (_RINGS[0] * costs.expert_bytes)
        raise SettingError(f"nothing fits: the dense part and a ring of {_RINGS[0]} expert slots "
                         f"alone need {format_bytes(need)} of GPU memory (budget "
                         f"{format_bytes(budget.gpu_bytes)}), or the host budget "
                         f"{format_bytes(budget.host_bytes)} holds no KV cache after the experts")
    shares = ([s for s in _CPU_SHARES if s <= budget.max_cpu_attention_share]
              if profile.device != "cpu" else [0.0])  # on a CPU run the host is the device
    found = [replace(c, cpu_share=s) for c in found for s in shares
             if s == 0 or host_memory(costs, replace(c, cpu_share=s),
                                      max_tokens).running <= budget.host_bytes]
    # The device gathers the KV itself where it can; the model weighs that against the host.
    gathers = ["staged"] + (["mapped"] if profile.mapped_gather_bytes_per_s > 0 else [])
    found = [replace(c, kv_gather=g) for c in found for g in gathers]
    scored = [(predict(costs, profile, c, context), c) for c in found]
    prediction, best = _best(scored)
    device_only = [pc for pc in scored if pc[1].cpu_share == 0]
    fallback = _best(device_only)
    if prediction.tokens_per_s < _HOST_SHARE_MARGIN * fallback[0].tokens_per_s:
        prediction, best = fallback
    all_resident = best.num_resident >= costs.num_experts
    pages = best.batch * -(-(budget.prompt_tokens + budget.max_new_tokens) // _PAGE_TOKENS)
    pairs = max(best.micro_batch * context * costs.attention_work_bytes_per_key()
                // (costs.spec.attention.num_heads * _SCORE_BYTES), 1)
    return Plan(max_batch_size=best.batch, micro_batch_size=best.micro_batch,
                max_prefill_tokens=best.prefill_tokens, page_tokens=_PAGE_TOKENS,
                num_kv_pages=pages, num_resident_experts=best.num_resident, ring_size=best.ring,
                max_attention_pairs=pairs, cpu_attention_share=best.cpu_share,
                host_attention_kernel=(profile.cpu_attention_kernel if best.cpu_share > 0
                                       else "torch"),
                kv_lookahead=kv_lookahead(best), kv_gather=best.kv_gather,
                offload=not all_resident, prediction=prediction,
                host_memory=host_memory(costs, best, max_tokens))
