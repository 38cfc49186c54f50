"""Scenarios S1 and S3 of BENCHMARKS.md for moe-gen: module-based batching with the planner's
prediction and bound, steady-state decode at the planned batch beside a full run, and
transformers + accelerate (`device_map="auto"`, same GPU budget, its largest batch that fits).

- `mixtral`: S1, Mixtral-8x7B shapes truncated to 8 layers, 12 GiB;
- `dsv2-lite`: S1, DeepSeek-V2-Lite shapes, 10 GiB;
- `s3`: S3, Qwen3-30B-A3B shapes truncated to 24 layers, 16 GiB (issue 18: 512 prompts of 512
  tokens, 192 new tokens);
- `tiny`: the embedded tiny model, a CPU smoke test of the script itself.

Dummy weights (tiled uniform noise; `--expert-dtype fp8`: that noise quantised to FP8 with real
per-channel scales), random prompts, EOS ignored, routing set explicitly (`--routing`, default
uniform random top-k). The budget is the whole process's GPU memory, enforced with
`torch.cuda.set_per_process_memory_fraction` for both systems.

Per scenario, in order: load, profile, plan; steady-state decode (`--steady-steps` timed steps
at a fixed context per host-attention share of `--steady-shares`, `steady_decode.py`); unless
`--steady-only`, the full run (its plan's host share: `--full-share`); the peer unless
`--skip-peer`. The record is rewritten after every phase (and every `--save-every-s` seconds of
the full run), so a run cut short keeps what it measured.

    PYTHONPATH=packages/moe-core/src:packages/moe-gen/src python3 benchmarks/moe_gen_s1.py \\
        --out results/ --scenarios s3 --num-prompts 512 --new-tokens 192 --skip-peer

Writes `moe-gen-<scenario>[-fp8][-steady].json` per scenario into --out and prints a table last.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from dummy_weights import dummy_store
from moe_core import load_model, parse_bytes, routing_for
from moe_gen import Defaults, GenRequest
from moe_gen.api import run_requests
from moe_gen.batch_loop import StepStats
from moe_gen.cost_model import ModelCosts
from moe_gen.engine import BatchEngine
from moe_gen.micro_batch import SequenceInput
from moe_gen.model_setup import install_streaming
from moe_gen.plan import Plan
from moe_gen.planner import Budget, make_plan
from moe_gen.profile import profile_device
from moe_gen.summary import summarise
from run_commit import commit
from steady_decode import SteadyConfig, plan_breakdown, run_steady, share_list
from step_trace import profile_steps

__all__ = ["SCENARIOS", "set_budget"]

# key: (standard scenario, model shape, decoder layers kept, GPU budget)
SCENARIOS = {"mixtral": ("S1", "mixtral-8x7b", 8, "12GiB"),
             "dsv2-lite": ("S1", "deepseek-v2-lite", None, "10GiB"),
             "s3": ("S3", "qwen3-30b-a3b", 24, "16GiB"),
             "tiny": ("smoke", "tiny-moe", None, "1GiB")}
ROUTING_NOTE = {"uniform": "uniform random top-k (moe_core.uniform_routing: each MoE layer draws "
                           "torch.rand [T, E] + topk on the device instead of its router)",
                "model": "the dummy model's own routers (random weights)"}


def set_budget(budget: str) -> None:
    """Cap the whole process's GPU memory at `budget`."""
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(parse_bytes(budget) / total, 1.0))


def host_memory_now() -> dict[str, int]:
    """The process's peak and current resident host memory (bytes): `/proc/self/status` VmHWM
    and VmRSS (page-locked arenas included), else `getrusage`'s peak."""
    status = Path("/proc/self/status")
    if status.is_file():
        fields = dict(line.split(":", 1) for line in status.read_text().splitlines()
                      if ":" in line)
        found = {key: int(fields[name].split()[0]) * 1024
                 for key, name in (("peak_rss_bytes", "VmHWM"), ("rss_bytes", "VmRSS"))
                 if name in fields}
        if found:
            return found
    import resource

    return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def gpu_memory_now(device: str) -> dict[str, int] | None:
    """Peak allocated and reserved GPU memory since the last reset (None on the CPU)."""
    if device != "cuda":
        return None
    return {"peak_allocated_bytes": torch.cuda.max_memory_allocated(),
            "peak_reserved_bytes": torch.cuda.max_memory_reserved()}


def routing(model: Any, spec: str) -> contextlib.AbstractContextManager[None]:
    """The benchmark's routing over `model` (`model`: its own routers)."""
    torch.manual_seed(0)  # uniform and Zipf draws repeat run to run
    return contextlib.nullcontext() if spec == "model" else routing_for(model, spec)


def run_ours(args: argparse.Namespace, name: str, layers: int | None, budget: str,
             ours: dict[str, Any], save: Any) -> None:
    """Load, plan, steady-state and full run of our engine, filling `ours` (saved as it goes)."""
    device, fp8 = args.device, args.expert_dtype == "fp8"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    t0 = time.perf_counter()
    model = load_model(name, "cpu", dtype, dummy=True, num_layers=layers, load_experts=False)
    store = dummy_store(model.spec, dtype, pin=device == "cuda", fp8=fp8)
    ours.update(load_s=time.perf_counter() - t0, store_bytes=store.nbytes,
                host_memory_after_load=host_memory_now())
    profile = profile_device(model.spec, device, dtype)
    host_budget = parse_bytes(args.host_memory)
    plan = make_plan(model.spec, dtype, profile, Budget(
        gpu_bytes=parse_bytes(budget), host_bytes=host_budget,
        prompt_tokens=args.prompt_tokens, max_new_tokens=args.new_tokens,
        num_requests=args.num_prompts, reserve_bytes=parse_bytes("1.5GiB") * (device == "cuda"),
        max_cpu_attention_share=args.max_cpu_attention_share), fp8)
    costs = ModelCosts.of(model.spec, dtype, fp8)
    context = args.prompt_tokens + args.new_tokens // 2  # the planner's mean context
    kernel = args.host_kernel if args.host_kernel != "profile" else (
        plan.host_attention_kernel if plan.cpu_attention_share > 0
        else profile.cpu_attention_kernel)
    ours.update(profile=profile.to_dict(), plan=plan.to_dict(), plan_context=context,
                plan_breakdown=plan_breakdown(costs, profile, plan, context,
                                              plan.cpu_attention_share),
                host_attention_kernel=kernel, setup_s=time.perf_counter() - t0)
    print(f"ours {name}: plan {plan.to_dict()}", flush=True)
    save()
    loaded = install_streaming(model, plan, device, store, fp8_experts=fp8)
    runtime = loaded.runtime
    with routing(loaded.model, args.routing):
        if args.steady_steps > 0:
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            config = SteadyConfig(args.steady_context or context,
                                  share_list(args.steady_shares, plan.cpu_attention_share),
                                  args.steady_warmup, args.steady_steps,
                                  args.out / f"trace-{name}-steady"
                                  if args.trace and device == "cuda" else None,
                                  tuple(args.steady_kv_gathers.split(",")))
            rows: list[dict[str, Any]] = []
            ours["steady"] = rows

            def keep(row: dict[str, Any]) -> None:
                rows.append(row)
                print(f"steady {name}: {json.dumps(row)[:600]}", flush=True)
                save()

            run_steady(loaded.model, runtime, plan, profile, costs, config, kernel, keep)
            ours.update(steady_gpu_memory=gpu_memory_now(device),
                        host_memory_after_steady=host_memory_now())
            save()
        if not args.steady_only:
            try:
                chosen = run_plan(args, plan, ours, kernel)
                ours["full_run_plan"]["predicted"] = plan_breakdown(
                    costs, profile, chosen, context, chosen.cpu_attention_share)

                def bound_at(ctx: int, share: float, plan: Plan = chosen) -> float:
                    return plan_breakdown(costs, profile, plan, ctx, share)["bound_s"]

                full_run(args, name, loaded.model, runtime, chosen, ours, save, bound_at)
            except Exception:  # keep the steady state and the setup in the record
                ours["full_run_error"] = traceback.format_exc()[-1500:]
                print(ours["full_run_error"], file=sys.stderr, flush=True)
    peak = host_memory_now()
    ours.update(host_memory_end=peak, host_memory_budget_bytes=host_budget,
                peak_rss_within_host_budget=peak["peak_rss_bytes"] <= host_budget)
    save()
    loaded = model = store = runtime = None  # free before the peer loads
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch._C._host_emptyCache()


def run_plan(args: argparse.Namespace, plan: Plan, ours: dict[str, Any], kernel: str) -> Plan:
    """The plan the full run uses: the planner's, or (`--full-share`) another host share, e.g.
    the one measured fastest in steady state (`auto`); the record says which and why."""
    share, why = plan.cpu_attention_share, "planned"
    measured = [r for r in ours.get("steady", []) if r.get("step_s")]
    if args.full_share == "auto" and measured:
        best = min(measured, key=lambda r: r["step_s"])
        share, why = best["cpu_attention_share"], "fastest steady-state share"
    elif args.full_share not in ("auto", "planned"):
        share, why = float(args.full_share), "--full-share"
    ours["full_run_plan"] = {"cpu_attention_share": share, "why": why,
                             "host_attention_kernel": kernel if share > 0 else "torch"}
    return replace(plan, cpu_attention_share=share,
                   host_attention_kernel=kernel if share > 0 else "torch")


def full_run(args: argparse.Namespace, name: str, model: Any, runtime: Any, plan: Plan,
             ours: dict[str, Any], save: Any, bound_at: Callable[[int, float], float]) -> None:
    """Every prompt to its token limit; decode figures over the full-batch decode steps, and
    each of them against the planner's bound at its own context and host share
    (`bound_at(context, share)`: the bound step seconds of a full batch). The planned share is
    tried against none on the first decode steps as any job does (`HostShareTrial`); a share
    given with `--full-share` stays."""
    device = args.device
    counters = runtime.stats if runtime is not None else None
    generator = torch.Generator().manual_seed(1)
    vocab = model.spec.vocab_size
    requests = [(i, GenRequest(str(i), token_ids=tuple(torch.randint(
        3, vocab, (args.prompt_tokens,), generator=generator).tolist())))
        for i in range(args.num_prompts)]
    steps: list[StepStats] = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = last_save = time.perf_counter()

    def stepped(stats: StepStats) -> None:
        nonlocal last_save
        steps.append(stats)
        if time.perf_counter() - last_save > args.save_every_s:
            last_save = time.perf_counter()
            partial = summarise(args.num_prompts, steps, last_save - t0, {}, plan,
                                host_memory_now()["peak_rss_bytes"]).to_dict()
            ours["full_run_partial"] = {**partial, "steps": len(steps),
                                        "decode_steps": sum(s.phase == "decode" for s in steps)}
            save()

    engine = run_requests(model, requests, plan, Defaults(max_new_tokens=args.new_tokens),
                          None, lambda _: None, stepped,
                          lambda: counters.bytes_copied if counters is not None else 0,
                          host_share_trial=args.full_share == "planned")
    wall = time.perf_counter() - t0
    context = args.prompt_tokens + args.new_tokens // 2
    trace = (trace_decode(engine, plan.max_batch_size, context,
                          args.out / f"trace-{name}.json.gz")
             if args.trace and device == "cuda" else None)
    offload = runtime.summary() if runtime else {}
    decode = [s for s in steps if s.phase == "decode" and len(s.chunks) == plan.max_batch_size]

    def median(values: list[float]) -> float | None:
        return statistics.median(values) if values else None

    ours.pop("full_run_partial", None)
    ours.update({
        "summary": summarise(args.num_prompts, steps, wall, offload, plan,
                             host_memory_now()["peak_rss_bytes"]).to_dict(),
        "offload": offload, "decode_steps": len(decode),
        "decode_step_median_s": median([s.seconds for s in decode]),
        "decode_attention_median_s": median([s.attention_s for s in decode]),
        "decode_moe_median_s": median([s.moe_s for s in decode]),
        "decode_h2d_median_bytes": median([s.h2d_bytes for s in decode]),
        # The context grows through the run: the median step of each quarter of it.
        "decode_step_median_s_by_quarter": [
            statistics.median(s.seconds for s in q)
            for q in (decode[i * len(decode) // 4 : (i + 1) * len(decode) // 4]
                      for i in range(4)) if q],
        "full_batch_decode": full_batch_decode(decode, plan.max_batch_size, bound_at),
        "peak_allocated_bytes": (torch.cuda.max_memory_allocated() if device == "cuda"
                                 else None),
        "full_run_gpu_memory": gpu_memory_now(device),
        "trace_context": context if trace is not None else None, "trace": trace})
    save()


def full_batch_decode(decode: list[StepStats], batch: int,
                      bound_at: Callable[[int, float], float]) -> dict[str, Any]:
    """The full-batch decode steps of a run against the planner's bound for those same steps
    (each at its own mean context and host share): the run's summary rate also counts the
    steps after the first sequences finish, whose batch shrinks while the experts' bytes do
    not."""
    if not decode:
        return {"steps": 0}
    seconds = sum(s.seconds for s in decode)
    bound = sum(bound_at(round(statistics.fmean(past + new for past, new in s.chunks)),
                         s.host_share) for s in decode)
    return {"steps": len(decode), "seconds": seconds, "bound_seconds": bound,
            "tokens_per_s": batch * len(decode) / seconds,
            "bound_tokens_per_s": batch * len(decode) / bound,
            "bound_over_measured": bound / seconds}


def trace_decode(engine: BatchEngine, batch: int, context: int, path: Path) -> dict[str, Any]:
    """Profile two full-batch decode steps at `context` with the run's own engine (after the run:
    the profiler's own cost stays out of the run's timings), on fresh page tables over the KV
    the run left in the arenas."""
    pages = engine.pages
    tables = [pages.allocate(context + 1) for _ in range(batch)]
    if any(t is None for t in tables):
        return {"error": "too few free KV pages to trace"}
    seqs = [SequenceInput(t, context, [3 + i % 100], i)  # type: ignore[arg-type]
            for i, t in enumerate(tables)]
    engine.step(seqs)  # warm-up
    summary = profile_steps(lambda: [engine.step(seqs) for _ in range(2)], 2, path)
    for table in tables:
        pages.release(table)  # type: ignore[arg-type]
    return summary


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--out", type=Path, required=True)
    add("--scenarios", default="mixtral,dsv2-lite", help=f"of {', '.join(SCENARIOS)}")
    add("--num-prompts", type=int, default=512)
    add("--prompt-tokens", type=int, default=512)
    add("--new-tokens", type=int, default=256)
    add("--num-layers", type=int, default=None, help="override the scenario's decoder layers")
    add("--gpu-memory", default=None, help="override the scenario's GPU budget, e.g. 16GiB")
    add("--host-memory", default="100GiB")
    add("--expert-dtype", choices=("bf16", "fp8"), default="bf16",
        help="routed experts stored and streamed as the run dtype (bf16 on the GPU) or FP8")
    add("--routing", default="uniform", help="uniform, zipf:s=S,reuse=R, or model (its routers)")
    add("--steady-only", action="store_true", help="no full run: steady-state decode only")
    add("--steady-steps", type=int, default=4, help="timed steady-state steps (0: none)")
    add("--steady-warmup", type=int, default=2)
    add("--steady-shares", default="planned,0",
        help="host attention shares measured in steady state (planned: the plan's)")
    add("--steady-context", type=int, default=0, help="default: prompt + new tokens / 2")
    add("--steady-kv-gathers", default="planned",
        help="KV gathers measured per steady share: planned (the plan's), staged, mapped")
    add("--full-share", default="planned",
        help="host share of the full run: planned, auto (fastest steady-state share) or a number")
    add("--host-kernel", choices=("profile", "torch", "numba"), default="profile",
        help="host attention kernel of shares > 0 (profile: the planner's / profile's choice)")
    add("--save-every-s", type=float, default=20.0)
    add("--peer-batches", type=lambda s: [int(x) for x in s.split(",")],
        default=[64, 32, 16, 8, 4, 1])
    add("--peer-steps", type=int, default=3)
    add("--skip-peer", action="store_true")
    add("--trace", action="store_true",
        help="profile two decode steps (CUDA) after each steady-state variant and after the "
             "full run, and summarise them")
    add("--max-cpu-attention-share", type=float, default=0.75)
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add("--commit", default=None, help="the commit that runs (default: git rev-parse; a device "
                                       "copy's git metadata can lag the working tree)")
    args = parser.parse_args()
    unknown = [k for k in args.scenarios.split(",") if k not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenarios {unknown}: choose from {', '.join(SCENARIOS)}")
    if args.routing not in ROUTING_NOTE and not args.routing.startswith("zipf"):
        parser.error(f"--routing {args.routing!r}: uniform, zipf:s=S,reuse=R or model")
    if args.full_share not in ("planned", "auto"):
        try:
            float(args.full_share)
        except ValueError:
            parser.error(f"--full-share {args.full_share!r}: planned, auto or a number")
    return args


def main() -> None:
    args = parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for key in args.scenarios.split(","):
        standard, name, layers, budget = SCENARIOS[key]
        layers, budget = args.num_layers or layers, args.gpu_memory or budget
        label = (f"{standard.lower()}-{key}" if standard == "S1" else key) + (
            "-fp8" if args.expert_dtype == "fp8" else "") + ("-steady" if args.steady_only else "")
        ours: dict[str, Any] = {}
        record: dict[str, Any] = {
            "scenario": f"{standard} {key}", "model": name, "num_layers": layers,
            "gpu_budget": budget, "host_memory_budget": args.host_memory,
            "expert_dtype": args.expert_dtype,
            "routing": {"spec": args.routing, "what": ROUTING_NOTE.get(args.routing, "zipf")},
            "mode": "steady-state only" if args.steady_only else "steady-state and full run",
            "commit": args.commit or commit(), "command": " ".join(sys.argv),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": (torch.cuda.get_device_name() if args.device == "cuda" else "cpu"),
            "workload": {k: getattr(args, k) for k in ("num_prompts", "prompt_tokens",
                                                      "new_tokens")}, "ours": ours}
        path = args.out / f"moe-gen-{label}.json"

        def save(record: dict[str, Any] = record, path: Path = path) -> None:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(record, indent=1) + "\n")
            tmp.replace(path)  # a reader (or a kill) never sees half a file

        if args.device == "cuda":
            set_budget(budget)
        try:
            run_ours(args, name, layers, budget, ours, save)
        except torch.OutOfMemoryError as exc:
            ours["error"] = f"OOM: {str(exc).splitlines()[0][:200]}"
        except Exception:  # report, keep the other scenarios
            ours["error"] = traceback.format_exc()[-1500:]
            print(ours["error"], file=sys.stderr, flush=True)
        save()
        if not args.skip_peer and args.device == "cuda":
            from hf_peer import run_peer

            try:
                record["peer"] = run_peer(args, name, layers, budget)
            except Exception as exc:  # report, keep the other scenarios
                record["peer"] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            save()
        rows.append(record)
        print(json.dumps(record)[:2000], flush=True)
    print_table(rows)


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'scenario':<16} {'what':<22} {'dec tok/s':>9} {'pred tok/s':>10} "
          f"{'bound tok/s':>11} {'step ms meas/pred':>17} {'prefill tok/s':>13} "
          f"{'peak RSS GiB':>12} {'peer dec tok/s':>14}")
    for r in rows:
        ours, peer = r.get("ours", {}), r.get("peer", {})
        scenario = f"{r['scenario']} {r['expert_dtype']}"
        rss = (ours.get("host_memory_end") or {}).get("peak_rss_bytes", 0) / 2**30
        lines = [(f"steady share {v['cpu_attention_share']:g}", v.get("decode_tokens_per_s"),
                  v["predicted"], v.get("step_s"), None) for v in ours.get("steady", [])]
        pred = ours.get("plan_breakdown") or {}
        if "summary" in ours:
            s = ours["summary"]
            run = ours.get("full_run_plan") or {}
            lines.append((f"full run share {run.get('cpu_attention_share', 0.0):g}",
                          s.get("decode_tokens_per_s"), run.get("predicted", pred),
                          ours.get("decode_step_median_s"), s.get("prefill_tokens_per_s")))
        if not lines:
            lines.append((ours.get("error", "no result")[-22:], None, pred, None, None))
        for what, dec, p, step, prefill in lines:
            peer_dec = peer.get("decode_tokens_per_s")
            print(f"{scenario:<16} {what:<22} {dec or 0:>9,.0f} {p.get('tokens_per_s', 0):>10,.0f} "
                  f"{p.get('bound_tokens_per_s', 0):>11,.0f} "
                  f"{(step or 0) * 1e3:>8,.0f}/{p.get('step_s', 0) * 1e3:<8,.0f} "
                  f"{prefill or 0:>13,.0f} {rss:>12.1f} "
                  f"{peer_dec if peer_dec is None else round(peer_dec, 1)!s:>14}")


if __name__ == "__main__":
    main()
