"""Two-lane offloaded decode (issue 15) beside the one-lane mapped fetch, the CPU expert kernels,
and the two-lane bound.

Scenario S3 (../shared/BENCHMARKS.md): Qwen3-30B-A3B shapes truncated to 24 layers, bf16 dummy
weights, 16 GiB of GPU memory in all (dense part, KV, workspace, expert slots), 512-token prompt,
**uniform random top-k routing** (set explicitly: dummy weights route every decode token of a
sequence to the same experts). Sections, each written to the JSON as it finishes:

- `cpu_kernels`: each CPU expert kernel on the host store's first layer at 1 and 4 tokens per
  expert, 4 and 8 experts per call: GB/s of expert weights read.
- `s3`: ms/token at batch 1 (one lane captured, two lanes captured, two lanes eager) and
  batches 4 and 16 (one and two lanes, captured); per run the hit rate, bytes per token of each
  lane, each lane's GB/s over the step, the lane's state after it (re-fitted rate and fixed
  cost, call shapes declined by the model before any call or dropped to one lane since, and
  each shape's expected saving per call when first split), and the bounds: one lane = missed
  bytes / pinned bandwidth; two lanes = missed bytes / (pinned + CPU rate), the best split of a
  perfect overlap.
  Each run records the path its layer calls took (`expert_path`, `OffloadedExecutor.call_path`
  at the step's bucket): batch 1 "mapped"; batches 4 and 16 "grouped", the grouped mapped path
  of decision 0016, which runs on the GPU lane alone (their two-lane runs are one-lane runs).
  The CPU lane's hand-over is `--handover` (default: flags); `s3_<other>` repeats batch 1 with
  the other hand-over on a fresh runtime (each runtime's lane adapts on its own). `--runs`
  picks runs (`1x2,1x1,4x1,16x1`: batch x lanes, `e` for eager) and skips `s3_<other>`.
  `--warmup` decode steps (default 12) precede the measured ones; the lane re-fits its rate on
  them (and on the capture's warm-up runs) every 96 layer calls, and may drop a call shape to
  one lane, before the measurement (with 4 steps at S3 the FP8 shape was dropped inside the
  measured steps); each two-lane run records the rate its steps were split by
  (`lane_cpu_gbps_splitting_the_steps`).
- `policies`: the cache plans of `POLICY_PLANS` (LRU admitting every miss, the cache as loaded,
  lookahead, activation-aware + lookahead, eager and captured) on the same S3 model under
  skewed routing (`zipf:s=1.1,reuse=0.5`) and under the embedded model's traced routing replayed
  onto S3's layers and experts; `--requests` batch-1 requests one after another so the
  activation-aware plan learns from finished ones: ms/token, hit rate, prefetches used/wasted.
- `s2`: scenario S2 (the same shapes, 48 layers, 16 GiB), batch 1, one and two lanes, captured.

`--expert-dtype fp8` holds the experts as FP8 (e4m3, a float32 scale per output channel,
decision 0015): the slots then cache about twice the experts, and each miss is half the bytes
for both lanes. The record's `expert_dtype` says which ran (`dtype` is the model's).

Run on the GPU machine (needs CuPy; ~20 GB of GPU memory, ~35 GB of host):
    PYTHONPATH=packages/moe-core/src python3 benchmarks/two_lane_decode.py --out $OUT/two.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from decode_latency import pinned_gbps  # the same measurement as the other decode records

GiB = 2**30
MODEL = "qwen3-30b-a3b"
DEVICE = "cuda"  # --smoke: the script's own check on the CPU (tiny model, no timings worth reading)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def empty_cache() -> None:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def bounded(budget: int | None) -> None:
    """Hold the process to `budget` bytes of GPU memory (None: the whole GPU again)."""
    if DEVICE == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(1.0 if budget is None else budget / total)


def numba_threading_layer() -> str:
    """The threading layer numba's parallel kernels run on here (after one parallel call)."""
    try:
        import numba
        import numpy as np

        @numba.njit(parallel=True)
        def _touch(x: Any) -> Any:
            total = 0.0
            for i in numba.prange(x.size):
                total += x[i]
            return total

        _touch(np.ones(64))
        return f"{numba.threading_layer()} ({numba.get_num_threads()} threads)"
    except Exception as exc:  # noqa: BLE001 (a report field)
        return f"unknown ({exc!r})"


def save(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)


def cpu_kernel_section(store: Any) -> dict[str, Any]:
    from moe_core.offload.cpu_experts import cpu_kernels, time_cpu_kernel

    blocks = store.arena(store.moe_layers[0]).view(store.num_experts, -1)
    out: dict[str, Any] = {"threads_torch": torch.get_num_threads(),
                           "cpu_count": os.cpu_count(), "expert_bytes": store.layout.nbytes}
    for kernel in cpu_kernels():
        for experts in (4, 8):
            for tokens in (1, 4):
                timing = time_cpu_kernel(kernel, blocks, store.layout, experts, tokens, repeats=7)
                out[f"{kernel.name}_e{experts}_t{tokens}_gbps"] = timing.gb_per_s
                out[f"{kernel.name}_e{experts}_t{tokens}_ms"] = timing.seconds * 1e3
                print(f"cpu kernel {kernel.name} experts={experts} tokens={tokens}: "
                      f"{timing.gb_per_s:.1f} GB/s ({timing.seconds * 1e3:.2f} ms)", flush=True)
    out.update(lane_thread_timings(store, blocks))
    return out


def lane_thread_timings(store: Any, blocks: Any) -> dict[str, Any]:
    """The numba kernel on cold experts as the lane runs it (from a thread of its own, one core
    left free), 4 experts x 1 token, and the host's copy bandwidth over 1 GiB of the store."""
    import threading

    from moe_core.offload.cpu_experts import NumbaCpuExperts, time_cpu_kernel
    from moe_core.offload.cpu_lane import _leave_cores_to_the_launcher

    out: dict[str, Any] = {}

    def in_thread() -> None:
        _leave_cores_to_the_launcher()
        timing = time_cpu_kernel(NumbaCpuExperts(), blocks, store.layout, 4, 1, repeats=7)
        out["numba_e4_t1_gbps_lane_thread"] = timing.gb_per_s

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    layers = store.moe_layers
    source = [store.arena(layer).view(-1) for layer in layers[len(layers) // 2:]]
    nbytes = 0
    chunks = []
    for arena in source:
        chunks.append(arena)
        nbytes += arena.numel() * arena.element_size()
        if nbytes >= GiB:
            break
    sink = [torch.empty_like(c, device="cpu", pin_memory=False) for c in chunks]
    for dst, src in zip(sink, chunks):
        dst.copy_(src)  # first touch of the sink
    start = time.perf_counter()
    for dst, src in zip(sink, chunks):
        dst.copy_(src)
    out["host_copy_gbps_read"] = nbytes / (time.perf_counter() - start) / 1e9
    del sink
    print(f"numba in a lane thread: {out['numba_e4_t1_gbps_lane_thread']:.1f} GB/s; host copy "
          f"{out['host_copy_gbps_read']:.1f} GB/s read", flush=True)
    return out


def run(model: Any, runtime: Any, batch: int, lanes: int, graphs: bool, prompt_tokens: int,
        steps: int, warmup: int = 4) -> dict[str, Any]:
    from moe_core.decode_runner import DecodeRunner, bucket_for

    saved = {layer: ex.two_lanes for layer, ex in runtime.executors.items()}
    assignments = bucket_for(batch) * model.spec.moe.router.top_k  # of each layer call
    paths = sorted({ex.call_path(assignments) for ex in runtime.executors.values()})
    if lanes == 1:
        for ex in runtime.executors.values():
            ex.two_lanes = None
    try:
        prompt = torch.randint(3, model.spec.vocab_size, (batch, prompt_tokens), device=DEVICE)
        runner = DecodeRunner(model, batch, prompt_tokens + warmup + steps + 1,
                              use_graphs=graphs and DEVICE == "cuda")
        token = runner.prefill(prompt, torch.ones_like(prompt)).argmax(dim=-1)
        active = torch.ones(batch, dtype=torch.bool, device=DEVICE)
        for _ in range(warmup):
            _, token = runner.step(token, active)
        before = runtime.snapshot(block=True)  # flushes the lane's counts: a re-fit may follow
        lanes_now = runtime.two_lanes
        split_rate = (lanes_now.rates.cpu_bytes_per_s / 1e9
                      if lanes_now is not None and lanes == 2 else None)
        times = []
        for _ in range(steps):
            sync()
            t0 = time.perf_counter()
            _, token = runner.step(token, active)
            sync()
            times.append(time.perf_counter() - t0)
        after = runtime.snapshot(block=True)
        captured = sorted(runner._graphs)
        del runner
    finally:
        for layer, ex in runtime.executors.items():
            ex.two_lanes = saved[layer]
    gc.collect()
    median = statistics.median(times)
    per = {name: (getattr(after, name) - getattr(before, name)) / steps
           for name in ("hits", "misses", "cpu_experts", "mapped_bytes", "cpu_bytes",
                        "cpu_seconds")}
    uses = per["hits"] + per["misses"] + per["cpu_experts"]
    return {"batch": batch, "lanes": lanes, "graphs": graphs, "captured_buckets": captured,
            "expert_path": paths[0] if len(paths) == 1 else paths,
            "steps": steps, "warmup_steps": warmup,
            "lane_cpu_gbps_splitting_the_steps": split_rate,  # the re-fit the steps ran with
            "median_ms": median * 1e3,
            "p90_ms": sorted(times)[int(0.9 * (len(times) - 1))] * 1e3,
            "min_ms": min(times) * 1e3, "tokens_per_s": batch / median,
            "expert_uses_per_step": uses, "hit_rate": per["hits"] / max(uses, 1e-9),
            "gpu_lane_bytes_per_step": per["mapped_bytes"],
            "cpu_lane_bytes_per_step": per["cpu_bytes"],
            "cpu_lane_experts_per_step": per["cpu_experts"],
            "cpu_worker_ms_per_step": per["cpu_seconds"] * 1e3,
            "gpu_lane_gbps_over_step": per["mapped_bytes"] / median / 1e9,
            "cpu_lane_gbps_over_step": per["cpu_bytes"] / median / 1e9,
            "cpu_lane_gbps_while_working": per["cpu_bytes"] / max(per["cpu_seconds"], 1e-9) / 1e9,
            **lane_state(runtime)}


def lane_state(runtime: Any) -> dict[str, Any]:
    """The two-lane path's state after a run: what it adapted to."""
    lanes = runtime.two_lanes
    if lanes is None:
        return {}
    return {"lane_handover": lanes.lane.signals.name,
            "lane_round_trip_us": lanes.round_trip_s * 1e6,
            "lane_cpu_gbps_now": lanes.rates.cpu_bytes_per_s / 1e9,
            "lane_cpu_fixed_us_now": lanes.rates.cpu_fixed_s * 1e6,
            "lane_refits": lanes.refits,
            "lane_dropped_shapes": sorted(lanes.dropped),
            "lane_declined_shapes": sorted(lanes.declined),  # by the model, before any call
            "lane_expected_saving_us": {f"{t}x{k}": saving * 1e6  # per call, at first split
                                        for (t, k), saving in
                                        sorted(lanes.expected_saving_s.items())}}


def load_s(num_layers: int, args: argparse.Namespace) -> tuple[Any, Any, Any, float]:
    """S3's (or S2's) dummy model on the GPU with its experts moved to a pinned host store (FP8
    with `--expert-dtype fp8`: quantised as they are packed, on the GPU), and the slot pool that
    the budget leaves: `(model, store, pool, setup seconds)`."""
    from moe_core import FP8, GpuSlotPool, HostExpertStore, load_model

    t0 = time.perf_counter()
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    model = load_model(MODEL, DEVICE, dtype, dummy=True, seed=0, num_layers=num_layers)
    store = HostExpertStore.from_model(model, FP8 if args.expert_dtype == "fp8" else None)
    for block in model.moe_blocks():
        for param in block.experts.parameters():
            param.data = torch.empty(0, dtype=param.dtype, device=param.device)
    gc.collect()
    empty_cache()
    budget = int(args.gpu_memory_gib * GiB)
    used = torch.cuda.memory_allocated() if DEVICE == "cuda" else 0
    expert_memory = budget - used - int(args.reserve_gib * GiB)
    pool = GpuSlotPool.for_budget(store.layout, expert_memory, DEVICE,
                                  max_slots=len(store.experts()))
    return model, store, pool, time.perf_counter() - t0


def install(model: Any, store: Any, pool: Any, *, fetch: str = "mapped", two_lanes: bool = True,
            cpu_kernel: str = "auto", policy: str = "lru", prefetch: str = "none",
            handover: str = "auto", stage_misses: bool = True,
            in_place_limit: int | None = None) -> Any:
    """The on-demand runtime over `pool`, filled with the store's first experts; in-place calls
    stage their misses first (`OffloadedExecutor.stage_misses`) unless told not to, and take
    calls of up to `in_place_limit` T*K (None: the executor's default)."""
    from moe_core import cache_plan, install_offloading
    from moe_core.offload.copy_engines import make_copy_engine

    plan = cache_plan(policy, prefetch, model.spec)
    runtime = install_offloading(
        model, store, pool, make_copy_engine(DEVICE), plan.policy, fetch=fetch,  # type: ignore[arg-type]
        two_lanes=two_lanes, cpu_kernel=cpu_kernel, handover=handover,
        prefetcher=plan.prefetcher(model) if plan.prefetcher is not None else None)
    runtime.prefetch(store.experts()[: pool.num_slots])
    runtime.drain()
    for executor in runtime.executors.values():
        executor.stage_misses = stage_misses
        if in_place_limit is not None:
            executor.in_place_limit_assignments = in_place_limit
    if DEVICE == "cpu":  # --smoke: the tiny model's gather limit covers batch 16; lowered so
        # that batches 4 and 16 take the grouped mapped path, as they do at S3 shapes
        for executor in runtime.executors.values():
            executor.gather_limit_bytes = model.spec.moe.router.top_k * store.layout.nbytes
    return runtime


def uniform_section(model: Any, store: Any, pool: Any, runtime: Any, setup_s: float,
                    args: argparse.Namespace) -> dict[str, Any]:
    """The set-up of a uniform-routing section: slots, pinned bandwidth, lane calibration and
    the split table (`fill_uniform` adds the runs)."""
    from moe_core.offload.lane_split import cpu_share_table

    assert runtime.two_lanes is not None
    calibration = runtime.two_lanes.calibration
    pinned = pinned_gbps(store.layout.nbytes) if DEVICE == "cuda" else 1.0
    spec = model.spec.moe
    return {
        "gpu_memory_bytes": int(args.gpu_memory_gib * GiB), "num_slots": pool.num_slots,
        "num_layers": len(model.moe_blocks()),
        "cached_share": pool.num_slots / len(store.experts()),
        "setup_s": setup_s, "pinned_gbps_expert_block": pinned,
        "calibration": calibration.summary(),
        "split_table_batch1": cpu_share_table(calibration.rates, store.layout.nbytes,
                                              spec.num_experts, 1, spec.router.top_k),
        "routing": "uniform random top-k (moe_core.routing_control.uniform_routing)",
        "runs": []}


def fill_uniform(section: dict[str, Any], model: Any, runtime: Any, args: argparse.Namespace,
                 record: dict[str, Any], plan: list[tuple[int, int, bool]]) -> None:
    """ms/token under uniform routing for each `(batch, lanes, graphs)` of `plan`, with the
    bounds, saved as each run finishes."""
    from moe_core.routing_control import uniform_routing

    calibration = runtime.two_lanes.calibration
    pinned = section["pinned_gbps_expert_block"]
    with uniform_routing(model):
        for batch, lanes, graphs in plan:
            try:
                if DEVICE == "cuda":  # what the budget's reserve must hold beside the slots
                    torch.cuda.reset_peak_memory_stats()
                entry = run(model, runtime, batch, lanes, graphs, args.prompt_tokens, args.steps,
                            args.warmup)
                if DEVICE == "cuda":
                    entry["peak_gpu_allocated_bytes"] = torch.cuda.max_memory_allocated()
                    entry["peak_gpu_reserved_bytes"] = torch.cuda.max_memory_reserved()
            except Exception as exc:
                section["runs"].append({"batch": batch, "lanes": lanes, "graphs": graphs,
                                        "error": repr(exc), "trace": traceback.format_exc()})
                save(args.out, record)
                continue
            missed = entry["gpu_lane_bytes_per_step"] + entry["cpu_lane_bytes_per_step"]
            entry["bound_one_lane_ms"] = missed / (pinned * 1e9) * 1e3
            entry["bound_two_lanes_ms"] = missed / (
                pinned * 1e9 + calibration.rates.cpu_bytes_per_s) * 1e3
            section["runs"].append(entry)
            print(f"{section['num_layers']} layers batch {batch} lanes {lanes} graphs {graphs} "
                  f"path {entry['expert_path']} captured {entry['captured_buckets']}: "
                  f"{entry['median_ms']:.2f} ms (hit {entry['hit_rate']:.1%}, cpu "
                  f"{entry['cpu_lane_experts_per_step']:.1f} experts, bounds 1-lane "
                  f"{entry['bound_one_lane_ms']:.2f} 2-lane {entry['bound_two_lanes_ms']:.2f})",
                  flush=True)
            save(args.out, record)


def s3_section(args: argparse.Namespace, record: dict[str, Any]) -> None:
    model, store, pool, setup_s = load_s(args.s3_layers, args)
    record["cpu_kernels"] = cpu_kernel_section(store)
    save(args.out, record)
    other = "host_functions" if args.handover != "host_functions" else "flags"
    runtime = None
    sections = [
        ("s3", args.handover, args.runs or [(1, 2, True), (1, 1, True), (1, 2, False),
                                            (4, 2, True), (4, 1, True), (16, 2, True),
                                            (16, 1, True)]),
        (f"s3_{other}", other, [(1, 2, True), (1, 2, False)])]
    for key, handover, plan in sections[:1] if args.runs else sections:
        try:
            runtime = install(model, store, pool, cpu_kernel=args.cpu_kernel, handover=handover,
                              stage_misses=args.stage_misses == "on", in_place_limit=args.in_place_limit)
        except Exception:
            record[key] = {"error": traceback.format_exc()}
            print(record[key]["error"], flush=True)
            continue
        bounded(int(args.gpu_memory_gib * GiB))
        section = uniform_section(model, store, pool, runtime, setup_s, args)
        section["handover"] = runtime.two_lanes.lane.signals.name
        record[key] = section
        save(args.out, record)
        fill_uniform(section, model, runtime, args, record,
                     [run for run in plan if run[0] == 1] if args.batch1_only else plan)
        bounded(None)
        runtime.uninstall()
    if "policies" in args.sections:
        try:
            record["policies"] = {"runs": []}
            policies_section(model, store, pool, args, record)
        except Exception:
            record["policies"]["error"] = traceback.format_exc()
            print(record["policies"]["error"], flush=True)
        save(args.out, record)
    bounded(None)
    del model, store, pool, runtime
    gc.collect()
    empty_cache()


POLICY_PLANS = [  # (name, policy, prefetch, fetch, lanes, graphs)
    ("lru copy (admits every miss), eager", "lru", "none", "copy", 1, False),
    ("lru mapped 2 lanes (cache as loaded), graphs", "lru", "none", "mapped", 2, True),
    ("lru+lookahead mapped 2 lanes, eager", "lru", "lookahead", "mapped", 2, False),
    ("activation+lookahead mapped 2 lanes, eager", "activation", "lookahead", "mapped", 2,
     False),
    ("activation+lookahead mapped 2 lanes, graphs", "activation", "lookahead", "mapped", 2,
     True),
]


def routing_tape_of_tiny_model(prompts: int, new_tokens: int) -> Any:
    """The embedded model's own routing on the sample prompts, traced on the CPU (the tape the
    replay maps onto the target's layers and experts)."""
    import moe_core
    from moe_infinity import TraceConfig, routing_tape, trace_prompts
    from prefetch_hit_rates import moe_core_prompt, prompt_ids

    tiny = moe_core.load_model(moe_core.tiny_model_path(), dtype="float32")
    tokenizer = moe_core.load_tokenizer(moe_core.tiny_model_path())
    ids = prompt_ids(prompts)
    traced = trace_prompts(tiny, tokenizer, [moe_core_prompt(p, i) for i, p in enumerate(ids)],
                           moe_core.TINY_MODEL_NAME, TraceConfig(max_new_tokens=new_tokens))
    return routing_tape(traced)


def requests_run(model: Any, runtime: Any, graphs: bool, args: argparse.Namespace
                 ) -> dict[str, Any]:
    """`args.requests` batch-1 requests one after another (`begin_sequence` between them, so
    the activation-aware plan learns from the finished ones): each a prompt of
    `args.policy_prompt_tokens` and `args.policy_steps` decode steps; ms/token and hit rate of
    the decode steps (the first two of each request left out as warm-up)."""
    from moe_core.decode_runner import DecodeRunner

    times: list[float] = []
    counted = {"hits": 0, "misses": 0, "cpu_experts": 0, "mapped_bytes": 0, "cpu_bytes": 0,
               "prefetches_used": 0, "prefetches_wasted": 0, "prefetches_issued": 0}
    per_request = []
    for _ in range(args.requests):
        runtime.begin_sequence()
        prompt = torch.randint(3, model.spec.vocab_size, (1, args.policy_prompt_tokens),
                               device=DEVICE)
        runner = DecodeRunner(model, 1, args.policy_prompt_tokens + args.policy_steps + 2,
                              use_graphs=graphs and DEVICE == "cuda")
        token = runner.prefill(prompt, torch.ones_like(prompt)).argmax(dim=-1)
        active = torch.ones(1, dtype=torch.bool, device=DEVICE)
        request_times = []
        for i in range(args.policy_steps):
            if i == 2:
                before = runtime.snapshot(block=True)
            sync()
            t0 = time.perf_counter()
            _, token = runner.step(token, active)
            sync()
            if i >= 2:
                request_times.append(time.perf_counter() - t0)
        after = runtime.snapshot(block=True)
        for name in counted:
            counted[name] += getattr(after, name) - getattr(before, name)
        uses = (after.hits - before.hits) + (after.misses - before.misses) + (
            after.cpu_experts - before.cpu_experts)
        per_request.append({"median_ms": statistics.median(request_times) * 1e3,
                            "hit_rate": (after.hits - before.hits) / max(uses, 1)})
        times += request_times
        del runner
        gc.collect()
    uses = counted["hits"] + counted["misses"] + counted["cpu_experts"]
    steps = len(times)
    return {"median_ms": statistics.median(times) * 1e3, "mean_ms": statistics.fmean(times) * 1e3,
            "hit_rate": counted["hits"] / max(uses, 1), "steps": steps,
            "gpu_lane_bytes_per_step": counted["mapped_bytes"] / steps,
            "cpu_lane_bytes_per_step": counted["cpu_bytes"] / steps,
            "cpu_lane_experts_per_step": counted["cpu_experts"] / steps,
            "prefetches_issued": counted["prefetches_issued"],
            "prefetches_used": counted["prefetches_used"],
            "prefetches_wasted": counted["prefetches_wasted"], "per_request": per_request}


def policies_section(model: Any, store: Any, pool: Any, args: argparse.Namespace,
                     record: dict[str, Any]) -> None:
    """Each cache plan of `POLICY_PLANS` under skewed (Zipf with re-use) and replayed
    (the tiny model's traced routing) routing, batch 1, requests one after another."""
    from moe_core import replay_routing, routing_for

    section = record["policies"]
    section.update({"requests": args.requests, "prompt_tokens": args.policy_prompt_tokens,
                    "decode_steps_per_request": args.policy_steps,
                    "zipf": "zipf:s=1.1,reuse=0.5", "num_slots": pool.num_slots,
                    "cached_share": pool.num_slots / len(store.experts())})
    tape = routing_tape_of_tiny_model(14, 32)
    section["tape_steps"] = int(tape.ids.shape[0]) if hasattr(tape, "ids") else None
    routings = {"zipf": lambda: routing_for(model, section["zipf"]),
                "replay": lambda: replay_routing(model, tape, row_stride=1)}
    for routing_name, routing in routings.items():
        for name, policy, prefetch, fetch, lanes, graphs in POLICY_PLANS:
            entry: dict[str, Any] = {"routing": routing_name, "plan": name, "policy": policy,
                                     "prefetch": prefetch, "fetch": fetch, "lanes": lanes,
                                     "graphs": graphs}
            runtime = None
            try:
                runtime = install(model, store, pool, fetch=fetch, two_lanes=lanes == 2,
                                  cpu_kernel=args.cpu_kernel, policy=policy, prefetch=prefetch,
                                  handover=args.handover)
                bounded(int(args.gpu_memory_gib * GiB))
                torch.manual_seed(0)  # the same draws for every plan
                with routing():
                    entry.update(requests_run(model, runtime, graphs, args))
                print(f"{routing_name:6s} {name:46s} {entry['median_ms']:7.2f} ms  hit "
                      f"{entry['hit_rate']:.1%}  prefetch used/wasted "
                      f"{entry['prefetches_used']}/{entry['prefetches_wasted']}", flush=True)
            except Exception as exc:
                entry.update(error=repr(exc), trace=traceback.format_exc())
                print(entry["trace"], flush=True)
            finally:
                bounded(None)
                if runtime is not None:
                    runtime.uninstall()
            section["runs"].append(entry)
            save(args.out, record)


def s2_section(args: argparse.Namespace, record: dict[str, Any]) -> None:
    model, store, pool, setup_s = load_s(args.s2_layers, args)
    runtime = install(model, store, pool, cpu_kernel=args.cpu_kernel, handover=args.handover,
                      stage_misses=args.stage_misses == "on", in_place_limit=args.in_place_limit)
    bounded(int(args.gpu_memory_gib * GiB))
    section = uniform_section(model, store, pool, runtime, setup_s, args)
    section["handover"] = runtime.two_lanes.lane.signals.name
    record["s2"] = section
    save(args.out, record)
    fill_uniform(section, model, runtime, args, record, [(1, 2, True), (1, 1, True)])
    bounded(None)
    runtime.close()


def _runs(text: str) -> list[tuple[int, int, bool]]:
    """`--runs`: `(batch, lanes, captured)` of each `BATCHxLANES[e]`."""
    runs = []
    for item in (v.strip() for v in text.split(",") if v.strip()):
        eager = item.endswith("e")
        batch, _, lanes = item.removesuffix("e").partition("x")
        try:
            runs.append((int(batch), int(lanes), not eager))
        except ValueError:
            raise argparse.ArgumentTypeError(f"--runs: {item!r} is not BATCHxLANES[e]") from None
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--gpu-memory-gib", type=float, default=16.0)
    parser.add_argument("--reserve-gib", type=float, default=1.5)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=12,
                        help="decode steps before the measured ones; the lane re-fits on "
                             "them (and the capture's warm-up runs) before the measurement")
    parser.add_argument("--cpu-kernel", default="auto")
    parser.add_argument("--batch1-only", action="store_true",
                        help="s3: only the batch-1 runs (a short re-measurement)")
    parser.add_argument("--runs", type=_runs, default=None,
                        help="s3: only these runs, as BATCHxLANES[e] (e: eager), comma-separated, "
                             "e.g. 1x2,1x1,4x1,16x1 (and no second hand-over section)")
    parser.add_argument("--expert-dtype", choices=["fp8"], default=None,
                        help="fp8: hold the routed experts as e4m3 with a scale per output "
                             "channel (half of bf16's bytes per miss, about twice the cached "
                             "experts; default: the model dtype)")
    parser.add_argument("--stage-misses", choices=["on", "off"], default="on",
                        help="in-place calls: the distinct misses copied to staging rows "
                             "before the product kernel (on), or read over PCIe by it (off)")
    parser.add_argument("--in-place-limit", type=int, default=None,
                        help="most T*K of a call multiplied in place (default: the executor's, "
                             "128 = 16 tokens at top-8); e.g. 56 sends FP8 batches above 7 "
                             "tokens to the grouped path, as in the sixth session")
    parser.add_argument("--handover", default="flags",
                        help="the CPU lane's hand-over: flags, host_functions or auto")
    parser.add_argument("--sections", default="s3,policies,s2",
                        help="comma-separated: s3 (with the CPU kernels), policies, s2")
    parser.add_argument("--requests", type=int, default=4, help="policies: requests per plan")
    parser.add_argument("--policy-prompt-tokens", type=int, default=128)
    parser.add_argument("--policy-steps", type=int, default=32)
    parser.add_argument("--smoke", action="store_true",
                        help="check the script on the CPU: the embedded tiny model, 2 and 4 "
                             "layers, a few slots, short runs (no figures worth reading)")
    args = parser.parse_args()
    args.s3_layers, args.s2_layers = 24, 48
    if args.smoke:
        global DEVICE, MODEL
        DEVICE, MODEL = "cpu", "tiny-moe"
        args.s3_layers, args.s2_layers = 2, 4
        args.gpu_memory_gib, args.reserve_gib = 0.002, 0.0
        args.prompt_tokens, args.steps = 8, 3
        args.policy_prompt_tokens, args.policy_steps, args.requests = 8, 5, 2
    record: dict[str, Any] = {
        "script": "benchmarks/two_lane_decode.py", "date": time.strftime("%Y-%m-%d"),
        "gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else "none (--smoke)",
        "torch": torch.__version__, "model": MODEL, "num_layers": args.s3_layers,
        "dtype": "bfloat16" if DEVICE == "cuda" else "float32",
        "expert_dtype": args.expert_dtype or ("bfloat16" if DEVICE == "cuda" else "float32"),
        "stage_misses": args.stage_misses,
        "prompt_tokens": args.prompt_tokens,
        "steps": args.steps, "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
        "numba_threading_layer": numba_threading_layer()}
    save(args.out, record)
    for name, section in (("s3", s3_section), ("s2", s2_section)):
        if name not in args.sections:
            continue
        try:
            section(args, record)
        except Exception:
            record[f"{name}_error"] = traceback.format_exc()
            print(record[f"{name}_error"], flush=True)
        save(args.out, record)


if __name__ == "__main__":
    main()
