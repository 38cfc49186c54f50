"""The fused decode kernels (`moe_core.kernels`) against their torch fallbacks at Qwen3-30B-A3B's
decode shapes: median time per call from CUDA-graph replays, and the bandwidth that implies
(bytes of weights / KV cache a call must read, over its time).

    PYTHONPATH=packages/moe-core/src python3 benchmarks/decode_kernels.py \
        --out $OUT/decode_kernels.json

Each graph holds `n` calls on `n` different input sets (different experts, different KV caches)
so that repeated calls do not find their bytes in L2 (60 MB on the H200). Experts: T = 1, 4, 16,
64 tokens, top-8 of 128 experts of a slot pool (strided views). Attention: B = 1, 4, 16, 64,
H=32, G=4, E=128, S=1024. Norms and the router are launch-bound: `REPEATS` calls per graph on the
same inputs; their GB/s is shown for scale.
Runs in well under a minute on an H200 (most of it Triton compiling each tile configuration).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

D, WIDTH, K, W = 2048, 768, 8, 128  # Qwen3-30B-A3B: hidden, expert width I, top-k, experts
H, G, E, S = 32, 4, 128, 1024  # query heads, kv heads, head dim, keys
DTYPE = torch.bfloat16
L2_DEFEAT_BYTES = 256 * 2**20
"""Bytes a graph's calls should touch in total, so that each call reads cold HBM."""

REPEATS = 64
"""Calls per graph for the launch-bound ops (norms, router), whose inputs stay in L2 anyway: one
call per graph would time the graph launch, not the kernel."""

Call = Callable[[], object]


def graph_time_us(calls: Sequence[Call], replays: int = 20) -> float:
    """Median microseconds per call of `calls` captured back to back in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls[:2]:
            call()  # compile and warm outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    for _ in range(3):
        graph.replay()
    times_ms = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times_ms.append(start.elapsed_time(end))
    del graph
    return statistics.median(times_ms) * 1000 / len(calls)


def copies_for(bytes_per_call: int, low: int = 4, high: int = 64) -> int:
    """Input sets to rotate through so a graph touches `L2_DEFEAT_BYTES` in all."""
    return max(low, min(high, -(-L2_DEFEAT_BYTES // max(1, bytes_per_call))))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest difference over the largest magnitude."""
    diff = (actual.float() - expected.float()).abs().max().item()
    return diff / max(expected.float().abs().max().item(), 1e-30)


def compare(rows: list[dict[str, Any]], op: str, shape: str, bytes_per_call: int,
            kernel: Sequence[Call], fallback: Sequence[Call], error: float) -> None:
    """Time `kernel` and `fallback` call lists and append one result row each."""
    for impl, calls in (("triton", kernel), ("torch", fallback)):
        us = graph_time_us(calls)
        row = {"op": op, "shape": shape, "impl": impl, "us": round(us, 2),
               "bytes": bytes_per_call, "gb_per_s": round(bytes_per_call / us / 1e3, 1),
               "max_rel_err_vs_torch": error}
        rows.append(row)
        print(f"{op:14s} {shape:10s} {impl:7s} {us:9.2f} us {row['gb_per_s']:8.1f} GB/s",
              flush=True)


def bench_experts(rows: list[dict[str, Any]], tokens: int) -> None:
    """`moe_experts` vs `gathered_experts` on a `[W, 3*I*D]` slot pool."""
    from moe_core.kernels import moe_experts, moe_experts_reference
    from moe_core.offload.layout import ExpertLayout

    layout = ExpertLayout(hidden_size=D, intermediate_size=WIDTH, dtype=DTYPE)
    pool = torch.randn(W, layout.numel, device="cuda", dtype=DTYPE) * 0.02
    stacks = layout.stacked_views(pool)
    n = copies_for(tokens * K * layout.nbytes, high=32)
    inputs = []
    unique_bytes = 0
    for _ in range(n):
        index = torch.stack([torch.randperm(W, device="cuda")[:K] for _ in range(tokens)])
        inputs.append((torch.randn(tokens, D, device="cuda", dtype=DTYPE), index,
                       torch.rand(tokens, K, device="cuda")))
        unique_bytes += index.unique().numel() * layout.nbytes  # what one call must read
    error = relative_error(moe_experts(*inputs[0], *stacks),
                           moe_experts_reference(*inputs[0], *stacks))
    kernel = [lambda x=x: moe_experts(*x, *stacks) for x in inputs]
    fallback = [lambda x=x: moe_experts_reference(*x, *stacks) for x in inputs]
    compare(rows, "moe_experts", f"T={tokens}", unique_bytes // n, kernel, fallback, error)


def bench_attention(rows: list[dict[str, Any]], batch: int) -> None:
    """`decode_attention` vs SDPA on repeated heads, keys half masked at random."""
    from moe_core.kernels import decode_attention, decode_attention_reference

    cache_bytes = 2 * batch * S * G * E * DTYPE.itemsize
    inputs = []
    for _ in range(copies_for(cache_bytes)):
        kv = torch.randn(batch, S, 2, G, E, device="cuda", dtype=DTYPE)  # [B, S, k|v, G, E]
        mask = torch.where(torch.rand(batch, S, device="cuda") < 0.5, 0.0,
                           torch.finfo(torch.float32).min)
        mask[:, 0] = 0.0
        q = torch.randn(batch, H, E, device="cuda", dtype=DTYPE)
        inputs.append((q, kv[:, :, 0], kv[:, :, 1], mask, E**-0.5))
    error = relative_error(decode_attention(*inputs[0]), decode_attention_reference(*inputs[0]))
    kernel = [lambda x=x: decode_attention(*x) for x in inputs]
    fallback = [lambda x=x: decode_attention_reference(*x) for x in inputs]
    compare(rows, "decode_attn", f"B={batch}", cache_bytes, kernel, fallback, error)


def bench_norms(rows: list[dict[str, Any]], tokens: int) -> None:
    """`rms_norm` and `add_rms_norm` vs their references on `[T, D]` rows, bf16 weight."""
    from moe_core.kernels import (
        add_rms_norm,
        add_rms_norm_reference,
        rms_norm,
        rms_norm_reference,
    )

    weight = torch.randn(D, device="cuda", dtype=DTYPE)
    x = torch.randn(tokens, D, device="cuda", dtype=DTYPE)
    delta = torch.randn(tokens, D, device="cuda", dtype=DTYPE)
    row_bytes = tokens * D * DTYPE.itemsize
    error = relative_error(rms_norm(x, weight, 1e-6), rms_norm_reference(x, weight, 1e-6))
    compare(rows, "rms_norm", f"T={tokens}", 2 * row_bytes,
            [lambda: rms_norm(x, weight, 1e-6)] * REPEATS,
            [lambda: rms_norm_reference(x, weight, 1e-6)] * REPEATS, error)
    error = relative_error(add_rms_norm(x, delta, weight, 1e-6)[1],
                           add_rms_norm_reference(x, delta, weight, 1e-6)[1])
    compare(rows, "add_rms_norm", f"T={tokens}", 4 * row_bytes,
            [lambda: add_rms_norm(x, delta, weight, 1e-6)] * REPEATS,
            [lambda: add_rms_norm_reference(x, delta, weight, 1e-6)] * REPEATS, error)


def bench_router(rows: list[dict[str, Any]], tokens: int) -> None:
    """`softmax_topk` vs `route`'s rule on `[T, W]` bf16 logits."""
    from moe_core.kernels import softmax_topk, softmax_topk_reference

    logits = torch.randn(tokens, W, device="cuda", dtype=DTYPE)
    ids, weights = softmax_topk(logits, K, True, 1.0)
    expected_ids, expected_weights = softmax_topk_reference(logits, K, True, 1.0)
    same = torch.equal(ids.sort(dim=-1).values, expected_ids.sort(dim=-1).values)
    error = relative_error(weights.sort(dim=-1).values, expected_weights.sort(dim=-1).values)
    compare(rows, "softmax_topk", f"T={tokens}", logits.numel() * DTYPE.itemsize,
            [lambda: softmax_topk(logits, K, True, 1.0)] * REPEATS,
            [lambda: softmax_topk_reference(logits, K, True, 1.0)] * REPEATS,
            error if same else float("inf"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("error: needs a CUDA GPU", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for tokens in (1, 4, 16, 64):
        bench_experts(rows, tokens)
    for batch in (1, 4, 16, 64):
        bench_attention(rows, batch)
    for tokens in (1, 64):
        bench_norms(rows, tokens)
    for tokens in (1, 4, 16, 64):
        bench_router(rows, tokens)
    record = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": _triton_version(), "dtype": str(DTYPE), "results": rows,
              "wall_s": round(time.perf_counter() - started, 1)}
    print(f"wall {record['wall_s']} s", flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1), encoding="utf-8")
    return 0


def _triton_version() -> str:
    import triton

    return triton.__version__


if __name__ == "__main__":
    sys.exit(main())
