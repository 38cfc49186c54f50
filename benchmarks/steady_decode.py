"""Steady-state decode of moe-gen's engine (issue 18, item 3): full-batch decode steps at one fixed
context, at the planned batch, as `moe_gen_variants.py` runs them, beside the planner's
prediction and bound for the same step.

Every sequence sits at the same context (its KV pages filled with noise, never zeros), each step
attends that context and writes its new token at the same position, so steps are alike and their
median is the engine's decode step at that context, free of a full run's ramp-up, refills and
tail. Variants differ only in the share of the batch attended on the host (the planned share, 0,
...) and in who gathers the past KV (`kv_gathers`: the plan's, `staged` on the host, `mapped` by
the GPU); the loaded model, resident set and ring are the run's own.

What one variant reports: the median step, decode tokens/s (`batch / step`), bytes that crossed
PCIe per step (experts from the offload counters, KV from the mover), the link time those bytes
need at the profiled bandwidth, and the planner's prediction (`cost_model.predict`) and bound
for the same candidate at the same context.
"""

from __future__ import annotations

import gc
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from dummy_weights import noise, tile_into
from moe_core import MoEForCausalLM, OffloadRuntime
from moe_gen.cost_model import Candidate, ModelCosts, predict
from moe_gen.engine import BatchEngine, StepTiming
from moe_gen.micro_batch import SequenceInput
from moe_gen.paged_kv import PagedKV
from moe_gen.plan import Plan
from moe_gen.profile import DeviceProfile
from step_trace import profile_steps

__all__ = ["SteadyConfig", "plan_breakdown", "run_steady", "share_list"]


@dataclass(frozen=True)
class SteadyConfig:
    """How to measure.

    Attributes:
        context: Cached tokens of every sequence.
        shares: Host attention shares to measure, in order.
        warmup_steps: Untimed steps first (per variant).
        steps: Timed steps (the median is reported).
        trace: Also profile two steps of each variant after its timed ones (`step_trace`),
            keeping the gzipped chrome trace at `<trace>-share<S>-<gather>.json.gz`; None: no
            profile.
        kv_gathers: KV gathers to measure per share (`Plan.kv_gather` values; `planned`: the
            plan's), in order.
    """

    context: int
    shares: tuple[float, ...]
    warmup_steps: int = 2
    steps: int = 4
    trace: Path | None = None
    kv_gathers: tuple[str, ...] = ("planned",)

    def __post_init__(self) -> None:
        if self.context < 1 or self.steps < 1 or self.warmup_steps < 0:
            raise ValueError(f"SteadyConfig: context and steps must be >= 1 and warmup_steps "
                             f">= 0, got {self.context}, {self.steps}, {self.warmup_steps}")
        if not self.shares or any(not 0.0 <= s <= 1.0 for s in self.shares):
            raise ValueError(f"SteadyConfig.shares must be in [0, 1], got {self.shares}")
        if not self.kv_gathers or any(g not in ("planned", "staged", "mapped")
                                      for g in self.kv_gathers):
            raise ValueError(f"SteadyConfig.kv_gathers must be planned, staged or mapped, got "
                             f"{self.kv_gathers}")


def share_list(spec: str, planned: float) -> tuple[float, ...]:
    """`"planned,0,0.25"` -> the shares to measure (`planned` replaced by the plan's), in order,
    each once."""
    out: list[float] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        share = planned if part == "planned" else float(part)
        if share not in out:
            out.append(share)
    return tuple(out)


def plan_breakdown(costs: ModelCosts, profile: DeviceProfile, plan: Plan, context: int,
                   share: float, kv_gather: str | None = None) -> dict[str, float]:
    """The planner's view of one decode step of `plan` at `context` with host share `share`
    (and KV gather `kv_gather`, default the plan's): its prediction (seconds) with the bytes
    behind its PCIe terms."""
    candidate = Candidate(plan.max_batch_size, plan.micro_batch_size, plan.num_resident_experts,
                          plan.max_prefill_tokens, share, plan.ring_size,
                          kv_gather or plan.kv_gather)
    prediction = predict(costs, profile, candidate, context).to_dict()
    streamed = sum(costs.streamed_experts(plan.max_batch_size, plan.num_resident_experts))
    device_batch = (1 - share) * plan.max_batch_size
    return {**prediction, "cpu_attention_share": share,
            "streamed_experts": streamed,
            "expert_bytes": streamed * costs.expert_bytes,
            "kv_bytes_over_pcie": (device_batch * context * costs.kv_bytes_per_token
                                   if profile.device != "cpu" else 0.0),  # as the model says
            "kv_bytes_on_host": share * plan.max_batch_size * context * costs.kv_bytes_per_token,
            "h2d_bytes_per_s": profile.h2d_bytes_per_s}


def run_steady(model: MoEForCausalLM, runtime: OffloadRuntime | None, plan: Plan,
               profile: DeviceProfile, costs: ModelCosts, config: SteadyConfig,
               host_kernel: str, on_variant: Callable[[dict[str, Any]], None] = lambda _: None
               ) -> list[dict[str, Any]]:
    """Measure each share of `config` at the planned batch (one KV cache for all of them);
    `on_variant` gets each variant's row as soon as it is measured (a variant that fails is a
    row with its `error`, and the next one still runs)."""
    device = model.device
    cuda = device.type == "cuda"
    batch = plan.max_batch_size
    pages = PagedKV(model.spec, batch * -(-(config.context + 1) // plan.page_tokens),
                    plan.page_tokens, model.dtype, pin=cuda)
    block = noise()
    for tensors in pages.arenas.values():
        for arena in tensors:
            tile_into(arena.view(-1), block)
    tables = [pages.allocate(config.context + 1) for _ in range(batch)]
    seqs = [SequenceInput(t, config.context, [3 + i % 100], i)  # type: ignore[arg-type]
            for i, t in enumerate(tables)]
    rows = []
    variants = [(share, plan.kv_gather if gather == "planned" else gather)
                for share in config.shares for gather in config.kv_gathers]
    for share, gather in dict.fromkeys(variants):
        try:
            row = _variant(model, runtime, plan, pages, seqs, share, host_kernel, config, gather)
        except Exception as exc:  # keep the other variants (an OOM included)
            row = {"cpu_attention_share": share, "kv_gather": gather,
                   "error": f"{type(exc).__name__}: {exc}"[:400]}
        row["predicted"] = plan_breakdown(costs, profile, plan, config.context, share, gather)
        step = row.get("step_s")
        bound = row["predicted"]["bound_s"]
        if step:
            row["step_over_predicted"] = step / row["predicted"]["step_s"]
            row["bound_over_step"] = bound / step
            # The link time the measured bytes need: how much of the step the link explains.
            row["link_s_at_profiled_rate"] = ((row["expert_bytes_per_step"]
                                               + row["kv_bytes_per_step"])
                                              / profile.h2d_bytes_per_s)
        rows.append(row)
        on_variant(row)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return rows


def _variant(model: MoEForCausalLM, runtime: OffloadRuntime | None, plan: Plan,
             pages: PagedKV, seqs: list[SequenceInput], share: float, host_kernel: str,
             config: SteadyConfig, kv_gather: str) -> dict[str, Any]:
    """One variant's steps: warm-up, then the timed ones with their bytes."""
    engine = BatchEngine(model, pages, plan.micro_batch_size, plan.max_attention_pairs, share,
                         plan.kv_lookahead, host_kernel if share > 0 else "torch", kv_gather)
    for _ in range(config.warmup_steps):
        engine.step(seqs)
    experts_before = runtime.stats.bytes_copied if runtime is not None else 0
    kv_before = engine.mover.h2d_bytes
    timings = []
    for _ in range(config.steps):
        timing = StepTiming()
        engine.step(seqs, timing)  # synchronises the device at its end
        timings.append(timing)
    expert_bytes = ((runtime.stats.bytes_copied if runtime is not None else 0)
                    - experts_before) / config.steps
    kv_bytes = (engine.mover.h2d_bytes - kv_before) / config.steps
    step = statistics.median(t.total_s for t in timings)
    trace = None
    if config.trace is not None:  # after the timed steps: the profiler's cost stays out
        path = config.trace.with_name(f"{config.trace.name}-share{share:g}-{kv_gather}.json.gz")
        trace = profile_steps(lambda: [engine.step(seqs) for _ in range(2)], 2, path)
    engine.mover.close()
    return {"trace": trace, "cpu_attention_share": share, "kv_gather": kv_gather,
            "host_kernel": host_kernel if share > 0 else None,
            "batch": len(seqs), "context": config.context, "step_s": step,
            "steps_s": [t.total_s for t in timings],
            "decode_tokens_per_s": len(seqs) / step,
            "attention_phase_s": statistics.median(t.attention_s for t in timings),
            "moe_phase_s": statistics.median(t.moe_s for t in timings),
            "prepare_s": statistics.median(t.prepare_s for t in timings),
            # After the last layer: write-back, logits and the wait for the device's queue.
            "tail_s": statistics.median(t.total_s - t.prepare_s - t.attention_s - t.moe_s
                                        for t in timings),
            "expert_bytes_per_step": expert_bytes, "kv_bytes_per_step": kv_bytes}
