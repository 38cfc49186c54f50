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
  lane, each lane's GB/s over the step, and the bounds: one lane = missed bytes / pinned
  bandwidth; two lanes = missed bytes / (pinned + CPU rate), the best split of a perfect overlap.

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
    return out


def run(model: Any, runtime: Any, batch: int, lanes: int, graphs: bool, prompt_tokens: int,
        steps: int, warmup: int = 4) -> dict[str, Any]:
    from moe_core.decode_runner import DecodeRunner

    saved = {layer: ex.two_lanes for layer, ex in runtime.executors.items()}
    if lanes == 1:
        for ex in runtime.executors.values():
            ex.two_lanes = None
    try:
        prompt = torch.randint(3, model.spec.vocab_size, (batch, prompt_tokens), device="cuda")
        runner = DecodeRunner(model, batch, prompt_tokens + warmup + steps + 1,
                              use_graphs=graphs)
        token = runner.prefill(prompt, torch.ones_like(prompt)).argmax(dim=-1)
        active = torch.ones(batch, dtype=torch.bool, device="cuda")
        for _ in range(warmup):
            _, token = runner.step(token, active)
        before = runtime.snapshot(block=True)
        times = []
        for _ in range(steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            _, token = runner.step(token, active)
            torch.cuda.synchronize()
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
            "steps": steps, "median_ms": median * 1e3,
            "p90_ms": sorted(times)[int(0.9 * (len(times) - 1))] * 1e3,
            "min_ms": min(times) * 1e3, "tokens_per_s": batch / median,
            "expert_uses_per_step": uses, "hit_rate": per["hits"] / max(uses, 1e-9),
            "gpu_lane_bytes_per_step": per["mapped_bytes"],
            "cpu_lane_bytes_per_step": per["cpu_bytes"],
            "cpu_lane_experts_per_step": per["cpu_experts"],
            "cpu_worker_ms_per_step": per["cpu_seconds"] * 1e3,
            "gpu_lane_gbps_over_step": per["mapped_bytes"] / median / 1e9,
            "cpu_lane_gbps_over_step": per["cpu_bytes"] / median / 1e9,
            "cpu_lane_gbps_while_working": per["cpu_bytes"] / max(per["cpu_seconds"], 1e-9) / 1e9}


def s3_section(args: argparse.Namespace, record: dict[str, Any]) -> None:
    from moe_core import GpuSlotPool, HostExpertStore, install_offloading, load_model
    from moe_core.offload.copy_engines import make_copy_engine
    from moe_core.offload.lane_split import cpu_share_table
    from moe_core.routing_control import uniform_routing

    t0 = time.perf_counter()
    model = load_model(MODEL, "cuda", torch.bfloat16, dummy=True, seed=0, num_layers=24)
    store = HostExpertStore.from_model(model)
    for block in model.moe_blocks():
        for param in block.experts.parameters():
            param.data = torch.empty(0, dtype=param.dtype, device=param.device)
    gc.collect()
    torch.cuda.empty_cache()
    record["cpu_kernels"] = cpu_kernel_section(store)
    save(args.out, record)
    budget = int(args.gpu_memory_gib * GiB)
    expert_memory = budget - torch.cuda.memory_allocated() - int(args.reserve_gib * GiB)
    pool = GpuSlotPool.for_budget(store.layout, expert_memory, "cuda",
                                  max_slots=len(store.experts()))
    runtime = install_offloading(model, store, pool, make_copy_engine("cuda"), fetch="mapped",
                                 two_lanes=True, cpu_kernel=args.cpu_kernel)
    runtime.prefetch(store.experts()[: pool.num_slots])
    runtime.drain()
    torch.cuda.set_per_process_memory_fraction(
        budget / torch.cuda.get_device_properties(0).total_memory)
    assert runtime.two_lanes is not None
    calibration = runtime.two_lanes.calibration
    pinned = pinned_gbps(store.layout.nbytes)
    spec = model.spec.moe
    section: dict[str, Any] = {
        "gpu_memory_bytes": budget, "num_slots": pool.num_slots,
        "cached_share": pool.num_slots / len(store.experts()),
        "setup_s": time.perf_counter() - t0, "pinned_gbps_expert_block": pinned,
        "calibration": calibration.summary(),
        "split_table_batch1": cpu_share_table(calibration.rates, store.layout.nbytes,
                                              spec.num_experts, 1, spec.router.top_k),
        "routing": "uniform random top-k (moe_core.routing_control.uniform_routing)",
        "runs": []}
    record["s3"] = section
    save(args.out, record)
    plan = [(1, 2, True), (1, 1, True), (1, 2, False), (4, 2, True), (4, 1, True),
            (16, 2, True), (16, 1, True)]
    with uniform_routing(model):
        for batch, lanes, graphs in plan:
            try:
                entry = run(model, runtime, batch, lanes, graphs, args.prompt_tokens, args.steps)
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
            print(f"batch {batch} lanes {lanes} graphs {graphs}: {entry['median_ms']:.2f} ms "
                  f"(hit {entry['hit_rate']:.1%}, cpu {entry['cpu_lane_experts_per_step']:.1f} "
                  f"experts, bounds 1-lane {entry['bound_one_lane_ms']:.2f} 2-lane "
                  f"{entry['bound_two_lanes_ms']:.2f})", flush=True)
            save(args.out, record)
    torch.cuda.set_per_process_memory_fraction(1.0)
    runtime.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--gpu-memory-gib", type=float, default=16.0)
    parser.add_argument("--reserve-gib", type=float, default=1.5)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--cpu-kernel", default="auto")
    args = parser.parse_args()
    record: dict[str, Any] = {
        "script": "benchmarks/two_lane_decode.py", "date": time.strftime("%Y-%m-%d"),
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "model": MODEL,
        "num_layers": 24, "dtype": "bfloat16", "prompt_tokens": args.prompt_tokens,
        "steps": args.steps, "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")}
    save(args.out, record)
    try:
        s3_section(args, record)
    except Exception:
        record["error"] = traceback.format_exc()
        print(record["error"], flush=True)
    save(args.out, record)


if __name__ == "__main__":
    main()
