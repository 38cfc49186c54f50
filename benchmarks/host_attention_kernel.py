"""moe-gen's host decode attention (issue 18, item 1): GB/s of KV read per call, against the
host's own copy bandwidth, at 1..N threads, and torch's CPU path beside it.

Shapes: Mixtral-8x7B attention (32 query heads, 8 KV heads of 128, bf16), Qwen3-30B-A3B's (32
query heads, 4 KV heads of 128: scenario S3) and DeepSeek-V2-Lite's MLA latent (16 heads, latent
512 + rotary 64), `--batch` sequences of `--keys` keys in shuffled 16-token pages, as the engine's
arenas hold them. The copy bandwidth is numpy's copy of a 256 MiB
array (bytes read per second, the same unit). The issue's figure is the GB/s at 16 threads on the
GPU machine's host; any other machine's figures are only relative to its own copy bandwidth.

    PYTHONPATH=packages/moe-core/src:packages/moe-gen/src python3 \\
        benchmarks/host_attention_kernel.py --out r.json [--threads 1,16]

The record is rewritten after every thread count (a run cut short keeps what it measured).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numba
import numpy as np
import torch
from moe_core import ModelSpec, resolve_model_path
from moe_gen.host_machine import cpu_model
from moe_gen.paged_attention import NumbaPagedAttention, time_paged_attention
from moe_gen.profile import host_attention_rates

# name: (shipped shape, query heads, key parts' channels, value part, groups)
SHAPES = {"mixtral-gqa": ("mixtral-8x7b", 32, [128], 1, 8),
          "qwen3-30b-a3b-gqa": ("qwen3-30b-a3b", 32, [128], 1, 4),
          "deepseek-v2-lite-mla": ("deepseek-v2-lite", 16, [512, 64], 0, 1)}


def copy_gb_per_s(threads: int, repeats: int = 5) -> float:
    """Bytes read per second by numpy copying 256 MiB, split over `threads` numba threads."""
    src = np.random.rand(32 << 20)  # 256 MiB of float64
    dst = np.empty_like(src)
    chunks = np.array_split(np.arange(src.size), threads)
    bounds = [(c[0], c[-1] + 1) for c in chunks]

    @numba.njit(parallel=True, nogil=True)
    def copy(a: np.ndarray, b: np.ndarray, starts: np.ndarray, stops: np.ndarray) -> None:
        for i in numba.prange(starts.size):
            b[starts[i] : stops[i]] = a[starts[i] : stops[i]]

    starts = np.array([b[0] for b in bounds])
    stops = np.array([b[1] for b in bounds])
    copy(src, dst, starts, stops)
    best = min(_timed(lambda: copy(src, dst, starts, stops)) for _ in range(repeats))
    return src.nbytes / best / 1e9


def _timed(fn: object) -> float:
    start = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--keys", type=int, default=1024)
    parser.add_argument("--max-threads", type=int, default=numba.config.NUMBA_NUM_THREADS)
    parser.add_argument("--threads", default="",
                        help="thread counts to measure, e.g. 1,16 (default: 1, 2, 4, ... up to "
                             "--max-threads)")
    args = parser.parse_args()
    kernel = NumbaPagedAttention()
    most = numba.config.NUMBA_NUM_THREADS  # a host with fewer cores runs its most, and says so
    threads = (sorted({min(int(t), most) for t in args.threads.split(",")}) if args.threads else
               sorted({1, *(t for t in (2, 4, 8, 16, 32) if t <= args.max_threads),
                       args.max_threads}))
    runs: list[dict[str, object]] = []
    for count in threads:
        numba.set_num_threads(count)
        copy = copy_gb_per_s(count)
        torch.set_num_threads(count)
        for name, (shape, heads, parts, value, groups) in SHAPES.items():
            seconds, nbytes = time_paged_attention(kernel, heads, parts, value, groups,
                                                   torch.bfloat16, args.batch, args.keys)
            gb = nbytes / seconds / 1e9
            spec = ModelSpec.from_pretrained(resolve_model_path(shape, weights=False))
            torch_rate = host_attention_rates(spec, torch.bfloat16, args.batch,
                                              args.keys)["torch"]
            keys_per_s = args.batch * args.keys / seconds
            runs.append({"shape": name, "threads": count, "seconds": seconds, "kv_bytes": nbytes,
                         "kv_gb_per_s": gb, "copy_gb_per_s": copy, "share_of_copy": gb / copy,
                         "keys_per_s": keys_per_s, "torch_keys_per_s": torch_rate})
            print(f"{name:22s} {count:3d} threads: {gb:6.2f} GB/s of KV "
                  f"({gb / copy:.0%} of copy {copy:.2f} GB/s), {keys_per_s / 1e6:.2f} M keys/s "
                  f"(torch's path {torch_rate / 1e6:.2f} M keys/s)", flush=True)
        record = {"script": "benchmarks/host_attention_kernel.py",
                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  "machine": cpu_model() or platform.processor() or platform.machine(),
                  "cpu_count": os.cpu_count(), "batch": args.batch, "keys": args.keys,
                  "dtype": "bfloat16", "copy": "numba-parallel copy of 256 MiB, bytes read/s",
                  "threads_requested": args.threads or None, "numba_max_threads": most,
                  "runs": runs}
        args.out.write_text(json.dumps(record, indent=2) + "\n")  # after every thread count


if __name__ == "__main__":
    main()
