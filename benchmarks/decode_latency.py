"""Decode latency of the graph-captured decode step (issue 13), beside eager decoding and the floor.

Scenario S3 (../shared/BENCHMARKS.md): Qwen3-30B-A3B shapes truncated to 24 layers, bf16 dummy
weights, 512-token prompts, uniform random top-k routing (set explicitly: dummy weights route
every decode token of a sequence to the same experts). Sections, each written to the JSON as it
finishes:

- `resident`: every expert on the GPU; batch 1 eager (no graphs) and graph-captured at batches 1,
  4, 16 and 64. Floor = bytes a step must read (dense weights, the experts the batch routes to,
  the KV of its context) / the measured HBM copy bandwidth.
- `full48`: the same at batch 1 on all 48 layers.
- `offloaded`: 16 GiB of GPU memory in all (dense part, KV, workspace and expert slots), experts
  in pinned host memory, `fetch="mapped"`; batch 1 eager and captured. Bound = bytes of missed
  experts / measured pinned host-to-device bandwidth.

Run on the GPU machine (needs CuPy for the mapped fetch; ~65 GB of GPU memory, ~30 GB of host):
    PYTHONPATH=packages/moe-core/src python3 benchmarks/decode_latency.py --out $OUT/decode.json
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

GiB = 2**30
MODEL = "qwen3-30b-a3b"


def hbm_copy_gbps(nbytes: int = 2 * GiB) -> float:
    """Device-to-device copy rate, bytes read plus written per second / 1e9 (median of 5)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    rates = []
    for _ in range(6):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        rates.append(2 * src.numel() * 2 / (start.elapsed_time(end) / 1e3) / 1e9)
    return statistics.median(rates[1:])


def pinned_gbps(block_bytes: int, count: int = 32) -> float:
    """Back-to-back pinned host-to-device copies of `block_bytes` (median of 5 batches)."""
    src = torch.empty(block_bytes * count, dtype=torch.uint8, pin_memory=True).random_(0, 256)
    dst = torch.empty_like(src, device="cuda")
    rates = []
    for _ in range(6):
        torch.cuda._sleep(50_000_000)  # the host enqueues every copy before the first starts
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(count):
            part = slice(i * block_bytes, (i + 1) * block_bytes)
            dst[part].copy_(src[part], non_blocking=True)
        end.record()
        end.synchronize()
        rates.append(block_bytes * count / (start.elapsed_time(end) / 1e3) / 1e9)
    return statistics.median(rates[1:])


def step_times(model: Any, batch: int, prompt_tokens: int, steps: int, graphs: bool,
               warmup: int = 4) -> dict[str, Any]:
    """Per-step wall time of decoding (synchronised before and after each step), median and p90
    over `steps`, after `warmup` steps (the captures happen there)."""
    from moe_core.decode_runner import DecodeRunner

    vocab = model.spec.vocab_size
    prompt = torch.randint(3, vocab, (batch, prompt_tokens), device="cuda")
    mask = torch.ones_like(prompt)
    runner = DecodeRunner(model, batch, prompt_tokens + warmup + steps + 1, use_graphs=graphs)
    t0 = time.perf_counter()
    token = runner.prefill(prompt, mask).argmax(dim=-1)
    torch.cuda.synchronize()
    prefill_s = time.perf_counter() - t0
    active = torch.ones(batch, dtype=torch.bool, device="cuda")
    times = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        _, token = runner.step(token, active)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    captured = sorted(runner._graphs)
    del runner
    gc.collect()
    ordered = sorted(times)
    return {"batch": batch, "graphs": graphs, "captured_buckets": captured, "steps": steps,
            "median_ms": statistics.median(times) * 1e3,
            "p90_ms": ordered[int(0.9 * (len(ordered) - 1))] * 1e3,
            "min_ms": ordered[0] * 1e3, "tokens_per_s": batch / statistics.median(times),
            "prefill_s": prefill_s}


def generate_time(model: Any, prompt_tokens: int, new_tokens: int) -> dict[str, float]:
    """`model.generate` at batch 1 end to end: time per new token after the prefill."""
    prompt = torch.randint(3, model.spec.vocab_size, (1, prompt_tokens), device="cuda")
    model.generate(prompt, max_new_tokens=8, eos_token_id=[])  # warm: captures bucket 1
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(prompt, max_new_tokens=1, eos_token_id=[])
    torch.cuda.synchronize()
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=new_tokens, eos_token_id=[])
    torch.cuda.synchronize()
    total = time.perf_counter() - t0
    return {"new_tokens": int(out.shape[1]), "total_s": total, "prefill_s": prefill,
            "ms_per_token_after_prefill": (total - prefill) / (new_tokens - 1) * 1e3}


def step_bytes(model: Any, batch: int, context: int) -> dict[str, float]:
    """Bytes one decode step must read: every dense weight once (the embedding: its rows only),
    each expert the batch routes to once (uniform top-k: E(1-(1-K/E)^B) per layer expected),
    and the KV of the context."""
    spec = model.spec
    elem = 2  # bf16
    experts = {id(p) for b in model.moe_blocks() for p in b.experts.parameters()}
    embed = model.model.embed_tokens.weight  # the one table not read whole
    dense = sum(p.numel() * elem for p in model.parameters()
                if id(p) not in experts and p is not embed)
    if not spec.tie_word_embeddings:
        dense += batch * spec.hidden_size * elem
    e, k = spec.moe.num_experts, spec.moe.router.top_k
    distinct = e * (1 - (1 - k / e) ** batch)
    expert = len(model.moe_blocks()) * distinct * 3 * spec.hidden_size \
        * spec.moe.expert_intermediate_size * elem
    kv = batch * context * spec.kv_bytes_per_token("bfloat16")
    return {"dense_bytes": dense, "expert_bytes": expert, "kv_bytes": kv,
            "total_bytes": dense + expert + kv, "distinct_experts_per_layer": distinct}


def resident_section(args: argparse.Namespace, record: dict[str, Any], hbm: float,
                     num_layers: int, batches: list[int], eager: bool) -> None:
    from moe_core import load_model
    from moe_core.routing_control import uniform_routing

    t0 = time.perf_counter()
    model = load_model(MODEL, "cuda", torch.bfloat16, dummy=True, seed=0,
                       num_layers=num_layers)
    torch.cuda.synchronize()
    section: dict[str, Any] = {"num_layers": num_layers, "load_s": time.perf_counter() - t0,
                               "weights_bytes": sum(p.numel() * 2 for p in model.parameters()),
                               "runs": []}
    record[f"resident_{num_layers}"] = section
    # Batch 1 with the model's own router too: every step reads 8 experts per layer whatever
    # the routing, and the real router is one product and one fused top-k kernel, where the
    # uniform override is three kernels.
    entry = step_times(model, 1, args.prompt_tokens, args.steps, True)
    entry["routing"] = "the model's own router (dummy weights)"
    entry["floor"] = step_bytes(model, 1, args.prompt_tokens + args.steps // 2)
    entry["floor"]["floor_ms"] = entry["floor"]["total_bytes"] / (hbm * 1e9) * 1e3
    entry["over_floor"] = entry["median_ms"] / entry["floor"]["floor_ms"]
    section["own_router_batch1"] = entry
    print(f"resident x{num_layers} batch 1 graphs, own router: {entry['median_ms']:.3f} ms/step "
          f"(p90 {entry['p90_ms']:.3f})", flush=True)
    with uniform_routing(model):
        runs = [(1, False)] if eager else []
        runs += [(b, True) for b in batches]
        for batch, graphs in runs:
            entry = step_times(model, batch, args.prompt_tokens, args.steps, graphs)
            entry["floor"] = step_bytes(model, batch, args.prompt_tokens + args.steps // 2)
            entry["floor"]["floor_ms"] = entry["floor"]["total_bytes"] / (hbm * 1e9) * 1e3
            entry["over_floor"] = entry["median_ms"] / entry["floor"]["floor_ms"]
            section["runs"].append(entry)
            print(f"resident x{num_layers} batch {batch} graphs={graphs}: "
                  f"{entry['median_ms']:.3f} ms/step (p90 {entry['p90_ms']:.3f}), floor "
                  f"{entry['floor']['floor_ms']:.3f} ms", flush=True)
            save(args.out, record)
        if num_layers == 24:
            section["generate_batch1"] = generate_time(model, args.prompt_tokens, 128)
            print(f"generate: {section['generate_batch1']}", flush=True)
    save(args.out, record)
    model.release_decode_runner()
    del model
    gc.collect()
    torch.cuda.empty_cache()


def offloaded_section(args: argparse.Namespace, record: dict[str, Any]) -> None:
    from moe_core import (
        GpuSlotPool,
        HostExpertStore,
        install_offloading,
        load_model,
        make_copy_engine,
    )
    from moe_core.routing_control import uniform_routing

    model = load_model(MODEL, "cuda", torch.bfloat16, dummy=True, seed=0, num_layers=24)
    t0 = time.perf_counter()
    store = HostExpertStore.from_model(model)
    blocks = model.moe_blocks()
    for block in blocks:  # the experts now live in the store only
        for param in block.experts.parameters():
            param.data = torch.empty(0, dtype=param.dtype, device=param.device)
    gc.collect()
    torch.cuda.empty_cache()
    budget = int(args.gpu_memory_gib * GiB)
    expert_memory = budget - torch.cuda.memory_allocated() - int(args.reserve_gib * GiB)
    pool = GpuSlotPool.for_budget(store.layout, expert_memory, "cuda",
                                  max_slots=len(store.experts()))
    runtime = install_offloading(model, store, pool, make_copy_engine("cuda"), fetch="mapped")
    runtime.prefetch(store.experts()[: pool.num_slots])
    runtime.drain()
    torch.cuda.set_per_process_memory_fraction(
        budget / torch.cuda.get_device_properties(0).total_memory)
    torch.cuda.reset_peak_memory_stats()
    block_bytes = store.layout.nbytes
    section: dict[str, Any] = {
        "gpu_memory_bytes": budget, "num_slots": pool.num_slots,
        "num_experts": len(store.experts()), "cached_share": pool.num_slots / len(
            store.experts()), "setup_s": time.perf_counter() - t0,
        "pinned_gbps_expert_block": pinned_gbps(block_bytes),
        "pinned_gbps_64mb": pinned_gbps(64 * 2**20, count=8), "runs": []}
    record["offloaded"] = section
    save(args.out, record)
    with uniform_routing(model):
        for graphs in (False, True):
            before = runtime.snapshot(block=True)
            entry = step_times(model, 1, args.prompt_tokens, args.steps, graphs)
            after = runtime.snapshot(block=True)
            uses = (after.hits + after.misses) - (before.hits + before.misses)
            steps = args.steps + 4 + 1  # warm-up and prefill steps are in the delta
            mapped_per_token = (after.mapped_bytes - before.mapped_bytes) / steps
            entry.update({
                "expert_uses_per_token": uses / steps,
                "hit_rate": (after.hits - before.hits) / max(1, uses),
                "mapped_bytes_per_token": mapped_per_token,
                "bound_ms": mapped_per_token / (section["pinned_gbps_64mb"] * 1e9) * 1e3,
                "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
            })
            entry["over_bound"] = entry["median_ms"] / entry["bound_ms"]
            section["runs"].append(entry)
            print(f"offloaded graphs={graphs}: {entry['median_ms']:.2f} ms/token "
                  f"(p90 {entry['p90_ms']:.2f}), hit rate {entry['hit_rate']:.1%}, "
                  f"bound {entry['bound_ms']:.2f} ms", flush=True)
            save(args.out, record)
    torch.cuda.set_per_process_memory_fraction(1.0)
    model.release_decode_runner()
    runtime.drain()
    del model, store, runtime, pool
    gc.collect()
    torch.cuda.empty_cache()


def save(path: Path | None, record: dict[str, Any]) -> None:
    if path is not None:
        path.write_text(json.dumps(record, indent=1))


def guarded(name: str, record: dict[str, Any], fn: Callable[[], None]) -> None:
    """Run one section; a failure is recorded and the next section still runs."""
    try:
        fn()
    except Exception as exc:  # a benchmark reports and goes on
        record.setdefault("errors", {})[name] = traceback.format_exc()
        print(f"{name} failed: {exc}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="JSON record to write")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--batches", default="1,4,16,64")
    parser.add_argument("--sections", default="resident,full48,offloaded")
    parser.add_argument("--gpu-memory-gib", type=float, default=16.0)
    parser.add_argument("--reserve-gib", type=float, default=1.0,
                        help="of the budget, kept for KV, activations and workspace")
    parser.add_argument("--commit", default=None)
    args = parser.parse_args()
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                           capture_output=True, text=True).stdout.strip()
    record: dict[str, Any] = {
        "script": "benchmarks/decode_latency.py", "date": time.strftime("%Y-%m-%d"),
        "commit": commit, "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "model": MODEL, "dtype": "bfloat16", "routing": "uniform random top-k",
        "prompt_tokens": args.prompt_tokens, "steps": args.steps}
    torch.manual_seed(0)
    hbm = record["hbm_copy_gbps"] = hbm_copy_gbps()
    sections = args.sections.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    if "resident" in sections:
        guarded("resident", record,
                lambda: resident_section(args, record, hbm, 24, batches, eager=True))
    if "full48" in sections:
        guarded("full48", record,
                lambda: resident_section(args, record, hbm, 48, [1], eager=False))
    if "offloaded" in sections:
        guarded("offloaded", record, lambda: offloaded_section(args, record))
    save(args.out, record)


if __name__ == "__main__":
    main()
