"""Prefill latency of one prompt with offloaded experts: the copy path admitting every miss to the
cache (`prefill="admit"`) against the prefill ring streaming them (`prefill="stream"`, moe-core's
decision 0018). The expert part of `moe-infinity serve`'s TTFT (issue 16).

Scenario S3 (../shared/BENCHMARKS.md): Qwen3-30B-A3B shapes truncated to 24 layers, bf16 dummy
weights, a 16 GiB budget split as the server splits it (`plan_memory` with the S3 serving runs'
`--kv-memory 576MiB`: 1,527 expert slots, 50% of the experts), the mapped fetch, the cache filled with the store's first experts
(layer order, as `load_offloaded` fills it), **uniform random top-k routing**, and a 512-token
prompt prefilled in one pass (the server's idle step takes up to 4 x 256 prompt tokens). The
ring's slots come out of the same expert bytes (`ring_slots_for`: 8 at S3), as in the server.

Per mode (and per ring size of `--ring-slots`): `--warmup` prefills, then `--runs` prefills,
each on a freshly filled cache (admitting changes it; a server's first request sees the loaded
cache too), each timed between device synchronisations. Recorded: median, min and max ms; per
prefill the hits, misses, bytes over PCIe (streamed, copied into slots) and evictions; the link
bound (missed bytes / the pinned host-to-device rate measured here) and the rate achieved over
the prefill; the path the layer calls took (`OffloadedExecutor.call_path`); peak GPU memory.
The JSON is rewritten after each mode; a line per mode goes to stdout.

On the GPU machine (needs CuPy; ~30 GB of host memory for the pinned store):

    PYTHONPATH=packages/moe-core/src:packages/moe-infinity/src python3 \
        benchmarks/prefill_latency.py --out $OUT/prefill.json

`--expert-dtype fp8` holds the experts as FP8 (decision 0015). `--smoke` checks the script on
the CPU: the embedded tiny model in float32, a 40-token prompt, half its experts cached, the
gather and grouped limits lowered so that the prompt takes the copy or stream path as it does
at S3 (timings not worth reading).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
import traceback
from pathlib import Path
from typing import Any

import torch

GiB = 2**30
MODEL = "qwen3-30b-a3b"
DEVICE = "cuda"
COUNTED = ("hits", "misses", "evictions", "bytes_copied", "streamed_bytes", "mapped_bytes")


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def save(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)


def load(args: argparse.Namespace) -> tuple[Any, Any, float]:
    """The dummy model on the device with its experts moved to a pinned host store (FP8 with
    `--expert-dtype fp8`): `(model, store, setup seconds)`."""
    from moe_core import FP8, HostExpertStore, load_model

    started = time.perf_counter()
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    model = load_model(MODEL, DEVICE, dtype, dummy=True, seed=0, num_layers=args.num_layers)
    store = HostExpertStore.from_model(model, FP8 if args.expert_dtype == "fp8" else None,
                                       pin=DEVICE == "cuda")
    for block in model.moe_blocks():
        for param in block.experts.parameters():
            param.data = torch.empty(0, dtype=param.dtype, device=param.device)
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return model, store, time.perf_counter() - started


def expert_bytes(model: Any, store: Any, args: argparse.Namespace) -> int:
    """The expert slots' bytes: `--expert-memory-mib`, half the experts (`--smoke`), or the
    server's memory plan of `--gpu-memory-gib` and `--kv-memory-mib` (`moe-infinity serve
    --kv-memory`; 576 MiB, the S3 serving runs': 1,527 slots of 9.4 MB, 50% of the experts)."""
    if args.expert_memory_mib is not None:
        return int(args.expert_memory_mib * 2**20)
    if args.smoke:
        return len(store.experts()) // 2 * store.layout.nbytes
    from moe_infinity.serving.memory_plan import plan_memory

    return plan_memory(model.spec, model.dtype, int(args.gpu_memory_gib * GiB), args.max_batch,
                       int(args.kv_memory_mib * 2**20)).expert_bytes


def install(model: Any, store: Any, pool: Any, engine: Any, prefill: str,
            ring_slots: int | None) -> Any:
    """A fresh on-demand runtime over `pool` (mapped fetch, LRU), filled with the store's first
    experts."""
    from moe_core import install_offloading

    runtime = install_offloading(model, store, pool, engine, fetch="mapped", prefill=prefill,  # type: ignore[arg-type]
                                 prefill_ring_slots=ring_slots)
    runtime.prefetch(store.experts()[: pool.num_slots])
    runtime.drain()
    if DEVICE == "cpu":  # --smoke: the tiny model's limits would cover the whole prompt
        top_k = model.spec.moe.router.top_k
        for executor in runtime.executors.values():
            executor.gather_limit_bytes = top_k * store.layout.gather_nbytes
            executor.grouped_limit_assignments = 2 * top_k
    return runtime


def measure(model: Any, store: Any, budget: int, prefill: str, ring_slots: int | None,
            args: argparse.Namespace, pinned_gbps: float) -> dict[str, Any]:
    """Prefill times and counts of one mode, each run on a freshly filled cache."""
    from moe_core import GpuSlotPool
    from moe_core.offload.copy_engines import make_copy_engine
    from moe_core.offload.prefill_ring import ring_slots_for
    from moe_core.routing_control import uniform_routing

    layout = store.layout
    ring = (ring_slots or ring_slots_for(layout)) if prefill == "stream" else 0
    pool = GpuSlotPool.for_budget(layout, budget - ring * layout.nbytes, DEVICE,
                                  max_slots=len(store.experts()))
    engine = make_copy_engine(DEVICE)
    top_k = model.spec.moe.router.top_k
    times: list[float] = []
    counts: list[dict[str, int]] = []
    paths: set[str] = set()
    start_allocated = 0
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
        start_allocated = torch.cuda.memory_allocated()
    torch.manual_seed(0)  # the same prompts and routing draws for every mode
    with torch.no_grad(), uniform_routing(model):
        for i in range(args.warmup + args.runs):
            runtime = install(model, store, pool, engine, prefill, ring_slots)
            paths |= {x.call_path(args.prompt_tokens * top_k) for x in runtime.executors.values()}
            prompt = torch.randint(3, model.spec.vocab_size, (1, args.prompt_tokens),
                                   device=DEVICE)
            before = runtime.snapshot(block=True)
            sync()
            started = time.perf_counter()
            model(prompt, last_only=True)
            sync()
            elapsed = time.perf_counter() - started
            after = runtime.snapshot(block=True)
            if i >= args.warmup:
                times.append(elapsed)
                counts.append({name: getattr(after, name) - getattr(before, name)
                               for name in COUNTED})
            runtime.close()
    per = {name: statistics.mean(c[name] for c in counts) for name in COUNTED}
    missed_bytes = per["misses"] * layout.nbytes
    median = statistics.median(times)
    entry = {
        "prefill": prefill, "ring_slots": ring, "cache_slots": pool.num_slots,
        "cached_share": pool.num_slots / len(store.experts()),
        "expert_path": sorted(paths), "prompt_tokens": args.prompt_tokens,
        "runs": len(times), "median_ms": median * 1e3, "min_ms": min(times) * 1e3,
        "max_ms": max(times) * 1e3, "times_ms": [t * 1e3 for t in times],
        **{f"{name}_per_prefill": value for name, value in per.items()},
        "hit_rate": per["hits"] / max(per["hits"] + per["misses"], 1e-9),
        "missed_gb_per_prefill": missed_bytes / 1e9,
        "link_bound_ms": missed_bytes / (pinned_gbps * 1e9) * 1e3,
        "gbps_over_prefill": per["bytes_copied"] / median / 1e9,
    }
    if DEVICE == "cuda":
        # the process's peak counts the previous mode's pool too (its executors stay installed
        # in the model until this mode's first install): what the prefill itself adds is the
        # peak above the allocation at the start of the mode
        entry["peak_gpu_allocated_bytes"] = torch.cuda.max_memory_allocated()
        entry["peak_gpu_above_start_bytes"] = torch.cuda.max_memory_allocated() - start_allocated
    close = getattr(engine, "close", None)  # the CUDA engine's streams
    if close is not None:
        close()
    del pool
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return entry


def main() -> None:
    args = parse_args()
    record: dict[str, Any] = {"benchmark": "prefill_latency", "model": MODEL,
                              "device": DEVICE, "num_layers": args.num_layers,
                              "expert_dtype": args.expert_dtype,
                              "routing": "uniform random top-k (moe_core.uniform_routing)",
                              "fetch": "mapped", "policy": "lru", "modes": []}
    model, store, setup_s = load(args)
    budget = expert_bytes(model, store, args)
    pinned = 1.0
    if DEVICE == "cuda":
        from decode_latency import pinned_gbps  # the same measurement as the decode records

        pinned = pinned_gbps(store.layout.nbytes)
        record["gpu"] = torch.cuda.get_device_name()
    record.update(setup_s=setup_s, expert_memory_bytes=budget, expert_bytes=store.layout.nbytes,
                  num_experts=len(store.experts()), pinned_gbps_expert_block=pinned)
    save(args.out, record)
    plan = [("admit", None)] if "admit" in args.modes else []
    if "stream" in args.modes:
        plan += [("stream", slots) for slots in args.ring_slots or [None]]
    for prefill, ring_slots in plan:
        try:
            entry = measure(model, store, budget, prefill, ring_slots, args, pinned)
        except Exception as exc:  # recorded; the other modes still run
            entry = {"prefill": prefill, "ring_slots": ring_slots, "error": repr(exc),
                     "trace": traceback.format_exc()}
            print(entry["trace"], flush=True)
        else:
            print(f"prefill {prefill:6s} ring {entry['ring_slots']:2d}: median "
                  f"{entry['median_ms']:8.1f} ms (min {entry['min_ms']:.1f}, max "
                  f"{entry['max_ms']:.1f}), hit {entry['hit_rate']:.1%}, missed "
                  f"{entry['missed_gb_per_prefill']:.2f} GB, link bound "
                  f"{entry['link_bound_ms']:.1f} ms, {entry['gbps_over_prefill']:.1f} GB/s, "
                  f"evictions {entry['evictions_per_prefill']:.0f}, path "
                  f"{','.join(entry['expert_path'])}", flush=True)
        record["modes"].append(entry)
        save(args.out, record)


def _int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--modes", default="admit,stream",
                        help="comma-separated: admit, stream")
    parser.add_argument("--ring-slots", type=_int_list, default=None,
                        help="stream: ring sizes to measure, comma-separated (default: the "
                             "runtime's default, ring_slots_for the layout)")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--runs", type=int, default=None, help="measured prefills per mode "
                        "(default 5; --smoke 3)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--num-layers", type=int, default=24)
    parser.add_argument("--gpu-memory-gib", type=float, default=16.0)
    parser.add_argument("--max-batch", type=int, default=16,
                        help="the server's --max-batch, for its memory plan (serve_sweep "
                             "passes its largest concurrency, 16)")
    parser.add_argument("--kv-memory-mib", type=float, default=576.0,
                        help="the server's --kv-memory, for its memory plan (the S3 serving "
                             "runs': 576 MiB)")
    parser.add_argument("--expert-memory-mib", type=float, default=None,
                        help="the expert slots' bytes (ring included) instead of the plan's")
    parser.add_argument("--expert-dtype", choices=["fp8"], default=None)
    parser.add_argument("--smoke", action="store_true",
                        help="the embedded tiny model on the CPU, a 40-token prompt, half its "
                             "experts cached (checks the script; no timings worth reading)")
    args = parser.parse_args()
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(args.modes) - {"admit", "stream"}
    if unknown:
        parser.error(f"--modes: unknown {sorted(unknown)}")
    if args.smoke:
        global DEVICE, MODEL
        DEVICE, MODEL = "cpu", "tiny-moe"
        args.num_layers, args.prompt_tokens = 6, 40
    if args.runs is None:
        args.runs = 3 if args.smoke else 5
    return args


if __name__ == "__main__":
    main()
