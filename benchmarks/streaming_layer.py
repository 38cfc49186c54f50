"""Streaming one Mixtral-shaped MoE layer through a ring of GPU slots: do copies and compute
overlap?

Run on the GPU machine (needs CuPy):
    PYTHONPATH=packages/moe-core/src python3 benchmarks/streaming_layer.py --out $OUT/stream.json

The layer: 8 experts (hidden 4096, expert width 14336, bf16: 336 MiB each), 16,384 tokens routed
top-2 so that every expert gets exactly 4,096 tokens. Measured, each as the median of repeats:
- copy time: the 8 expert blocks copied host->GPU back to back through the copy engine;
- compute time: the same layer with all 8 experts resident (no copies);
- streamed time: `StreamingExecutor` with a ring of 2 slots (expert e+1 copying while e computes).
Acceptance (issue #4): streamed <= 1.15 x max(copy, compute). The streamed output must equal the
resident one (same kernels, same order).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

HIDDEN, WIDTH, EXPERTS, TOKENS_PER_EXPERT, TOP_K = 4096, 14336, 8, 4096, 2


def timed(fn: Any, repeats: int) -> tuple[float, Any]:
    """Median seconds of `fn()` (synchronised; one warm-up) and its last result."""
    times, result = [], None
    for i in range(repeats + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        result = fn()
        torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def run(repeats: int, ring_size: int) -> dict[str, Any]:
    """Every measurement; returns the JSON record."""
    from moe_core import (
        CopyLane,
        ExpertId,
        ExpertLayout,
        GpuSlotPool,
        HostExpertStore,
        make_copy_engine,
    )
    from moe_core.offload.stall_timer import StallTimer
    from moe_core.offload.stats import OffloadStats
    from moe_core.offload.streaming_executor import ExpertRing, StreamingExecutor

    layout = ExpertLayout(HIDDEN, WIDTH, torch.bfloat16)
    store = HostExpertStore.empty(layout, [0], EXPERTS, pin=True)
    generator = torch.Generator().manual_seed(0)
    for e in range(EXPERTS):
        block = store.block(ExpertId(0, e))
        block.copy_(torch.randn(block.shape, generator=generator) * 0.02)
    num_tokens = EXPERTS * TOKENS_PER_EXPERT // TOP_K
    hidden = torch.randn(num_tokens, HIDDEN, device="cuda", dtype=torch.bfloat16)  # [T, D]
    t = torch.arange(num_tokens, device="cuda")
    ids = torch.stack((t % EXPERTS, (t + EXPERTS // 2) % EXPERTS), dim=1)  # [T, K]
    weights = torch.full((num_tokens, TOP_K), 0.5, device="cuda")  # [T, K]
    assert torch.bincount(ids.reshape(-1)).tolist() == [TOKENS_PER_EXPERT] * EXPERTS

    def executor(resident: list[ExpertId], slots: int) -> tuple[StreamingExecutor, OffloadStats]:
        pool = GpuSlotPool(layout, slots, "cuda")
        engine = make_copy_engine("cuda")
        stats = OffloadStats()
        ring = ExpertRing(store, pool, engine, stats, StallTimer(pool.device), resident,
                          ring_size)
        return StreamingExecutor(ring, 0), stats

    everything = [ExpertId(0, e) for e in range(EXPERTS)]
    resident_exec, _ = executor(everything, EXPERTS + ring_size)
    compute_s, reference = timed(lambda: resident_exec(hidden, ids, weights), repeats)

    copy_pool = GpuSlotPool(layout, EXPERTS, "cuda")
    copy_engine = make_copy_engine("cuda")
    def copy_all() -> None:
        tickets = [copy_engine.submit(store.block(x), copy_pool.slot(x.expert), CopyLane.DEMAND)
                   for x in everything]
        for ticket in tickets:
            copy_engine.wait(ticket)

    copy_s, _ = timed(copy_all, repeats)

    stream_exec, stats = executor([], ring_size)
    streamed_s, out = timed(lambda: stream_exec(hidden, ids, weights), repeats)
    max_diff = (out.float() - reference.float()).abs().max().item()
    flops = 2 * 3 * HIDDEN * WIDTH * TOKENS_PER_EXPERT * EXPERTS
    bound_s = max(copy_s, compute_s)
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "hidden": HIDDEN, "expert_width": WIDTH, "experts": EXPERTS,
            "tokens_per_expert": TOKENS_PER_EXPERT, "ring_size": ring_size,
            "expert_bytes": layout.nbytes, "repeats": repeats,
            "copy_ms": copy_s * 1e3, "copy_gbps": EXPERTS * layout.nbytes / copy_s / 1e9,
            "compute_ms": compute_s * 1e3, "compute_tflops": flops / compute_s / 1e12,
            "streamed_ms": streamed_s * 1e3, "ratio": streamed_s / bound_s,
            "acceptance_met": streamed_s <= 1.15 * bound_s,
            "streamed_equals_resident_max_abs_diff": max_diff,
            "stats_all_calls": stats.summary()}


def main() -> None:
    """Parse arguments, measure, write JSON, print a summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ring-size", type=int, default=2)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("streaming_layer: needs a CUDA GPU")
    record = run(args.repeats, args.ring_size)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(record, indent=1))
    print(f"copy {record['copy_ms']:.1f} ms ({record['copy_gbps']:.1f} GB/s), compute "
          f"{record['compute_ms']:.1f} ms ({record['compute_tflops']:.0f} TFLOP/s), streamed "
          f"{record['streamed_ms']:.1f} ms = {record['ratio']:.3f} x max: "
          f"{'met' if record['acceptance_met'] else 'NOT met'} (<= 1.15)")


if __name__ == "__main__":
    main()
