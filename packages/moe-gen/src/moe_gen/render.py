"""Plain-text renderings of a plan and of a job's summary (stdout)."""

from __future__ import annotations

from moe_core import format_bytes

from moe_gen.job import JobOutcome
from moe_gen.plan import Plan
from moe_gen.profile import DeviceProfile

__all__ = ["plan_lines", "summary_lines"]


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms"


def plan_lines(plan: Plan, profile: DeviceProfile | None) -> list[str]:
    """The plan, the predicted decode step split into its terms, and the bound."""
    lines = [f"batch {plan.max_batch_size} sequences, attention micro-batches of "
             f"{plan.micro_batch_size}, up to {plan.max_prefill_tokens} prompt tokens per step",
             f"experts: {plan.num_resident_experts} resident, "
             + (f"the rest streamed through a ring of {plan.ring_size}" if plan.offload
                else "all resident (nothing streamed)"),
             f"KV cache: {plan.num_kv_pages} host pages of {plan.page_tokens} tokens; "
             f"{plan.cpu_attention_share:.0%} of each decode batch attended on the host"
             + (f" ({plan.host_attention_kernel})" if plan.cpu_attention_share else "")
             + f"; KV of {plan.kv_lookahead} micro-batches gathered ahead, "
             + {"mapped": "by the GPU from the host pages", "staged": "on the host"}.get(
                 plan.kv_gather, "by the GPU where it can read the host pages")]
    memory = plan.host_memory
    if memory is not None:
        lines.append(f"host memory: peak {format_bytes(memory.peak)} (generating "
                     f"{format_bytes(memory.running)}: experts {format_bytes(memory.experts)}, "
                     f"KV pages {format_bytes(memory.kv_pages)}, staging "
                     f"{format_bytes(memory.staging)}, host attention "
                     f"{format_bytes(memory.host_attention)}; loading "
                     f"{format_bytes(memory.loading)})")
    if profile is not None:
        lines.append(f"profile ({profile.device}): PCIe {profile.h2d_bytes_per_s / 1e9:.1f} GB/s, "
                     f"KV gather {profile.gather_bytes_per_s / 1e9:.1f} GB/s on the host"
                     + (f", {profile.mapped_gather_bytes_per_s / 1e9:.1f} GB/s by the GPU"
                        if profile.mapped_gather_bytes_per_s else "")
                     + f", matmul {profile.matmul_flops_per_s / 1e12:.1f} TFLOP/s, host attention "
                     f"{profile.cpu_attention_keys_per_s / 1e6:.1f} M keys/s "
                     f"({profile.cpu_attention_kernel})")
    p = plan.prediction
    if p is not None:
        lines += [f"predicted decode step {_ms(p.step_s)}: PCIe {_ms(p.pcie_s)} (experts "
                  f"{_ms(p.expert_pcie_s)}, KV {_ms(p.kv_pcie_s)}), GPU {_ms(p.gpu_s)}, "
                  f"CPU {_ms(p.cpu_s)}, host dispatch {_ms(p.dispatch_s)}",
                  f"predicted decode {p.tokens_per_s:,.0f} tok/s; bound {_ms(p.bound_s)} per "
                  f"step = {p.bound_tokens_per_s:,.0f} tok/s"]
    return lines


def summary_lines(outcome: JobOutcome) -> list[str]:
    """The end-of-job summary."""
    s = outcome.summary
    lines = [f"{s.requests} requests done ({outcome.skipped} already in the output), "
             f"{s.prompt_tokens} prompt + {s.output_tokens} generated tokens in {s.wall_s:.2f} s",
             f"prefill {s.prefill_tokens_per_s:,.0f} tok/s, decode {s.decode_tokens_per_s:,.0f} "
             f"tok/s, end-to-end {s.end_to_end_tokens_per_s:,.0f} tok/s",
             f"host-to-device {format_bytes(s.h2d_bytes)} (experts {format_bytes(s.expert_bytes)})"
             f", compute waiting on expert copies {s.stall_share:.0%} of step time"]
    if outcome.num_engines > 1:
        lines.append(f"on {outcome.num_engines} engines (Ray): prefill and decode rates are per "
                     "engine, end-to-end is the job's")
    if s.peak_host_bytes is not None:
        planned = outcome.plan.host_memory if outcome.plan is not None else None
        lines.append(f"host memory: process peak {format_bytes(s.peak_host_bytes)}"
                     + (f" (planned {format_bytes(planned.peak)})" if planned else ""))
    if outcome.expert_dtype is not None:
        lines.append(f"experts: {outcome.expert_dtype} (e4m3, a float32 scale per output "
                     f"channel), dequantised to {str(outcome.dtype).removeprefix('torch.')} "
                     f"on the device")
    if outcome.routing is not None:
        lines.append(f"routing: {outcome.routing} (benchmark routing: the model's routers "
                     "replaced)")
    if s.host_shares:
        host_planned = outcome.plan.cpu_attention_share if outcome.plan is not None else None
        runs = [f"{float(share):.1%}: {row['steps']} steps"
                + (f" (median {_ms(float(row['full_batch_median_s']))} at full batch)"
                   if row["full_batch_median_s"] is not None else "")
                for share, row in s.host_shares.items()]
        # A trial shows as steps at both shares; a share held fixed (or a trial that found no
        # pair of steps) shows one.
        tried = host_planned and len(s.host_shares) > 1
        lines.append("decode steps by host attention share"
                     + (f" (planned {host_planned:.1%}, tried against none on the first decode "
                        "steps, the faster kept)" if tried else "") + ": " + ", ".join(runs))
    if s.predicted_decode_step_s is not None:
        measured = ("n/a (no full-batch decode step)" if s.measured_decode_step_s is None
                    else _ms(s.measured_decode_step_s))
        lines.append(f"decode step: predicted {_ms(s.predicted_decode_step_s)}, measured "
                     f"{measured}")
    return lines
