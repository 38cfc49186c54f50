"""How fast can a GPU kernel read expert blocks straight from pinned host memory, against
`cudaMemcpyAsync` of the same blocks? The measurement behind decision 0004 (mapped fetch).

8 of 16 expert blocks of 9 MiB (Qwen3-30B-A3B, bf16) in a host-registered buffer, copied into
device memory by three CuPy kernels (v1: one 16-byte load per thread, grid-stride; v2: 4 loads
in flight; v3: one contiguous chunk per block, 8 loads in flight), over grids of 8..64 blocks
per expert and 128..512 threads, and by torch's non-blocking copies.

    PYTHONPATH=packages/moe-core/src python3 benchmarks/mapped_read.py --out $OUT/mapped_read.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

NUM_EXPERTS = 16  # expert blocks in the host buffer
BLOCK_ELEMS = 3 * 2048 * 768  # gate, up and down of one Qwen3-30B-A3B expert
BLOCK_BYTES = BLOCK_ELEMS * 2  # bf16
EXPERT_IDS = [1, 3, 4, 6, 9, 10, 13, 15]  # the 8 blocks read per call
KERNELS = ("v1", "v2", "v3")
GRID_X = (8, 16, 32, 64)  # blocks per expert
THREADS = (128, 256, 512)  # threads per block

# grid (gx, 8): blockIdx.y picks the expert (ids[blockIdx.y]) and its destination block;
# n16 is the block size in 16-byte words.
KERNEL_SOURCE = r"""
extern "C" __global__ void v1(const uint4* __restrict__ s0, uint4* __restrict__ d0,
                              const long long* ids, long long n16) {
  const uint4* s = s0 + ids[blockIdx.y] * n16; uint4* d = d0 + (long long)blockIdx.y * n16;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n16;
       i += (long long)gridDim.x * blockDim.x) d[i] = s[i];
}
extern "C" __global__ void v2(const uint4* __restrict__ s0, uint4* __restrict__ d0,
                              const long long* ids, long long n16) {
  const uint4* s = s0 + ids[blockIdx.y] * n16; uint4* d = d0 + (long long)blockIdx.y * n16;
  long long st = (long long)gridDim.x * blockDim.x,
            i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  for (; i + 3 * st < n16; i += 4 * st) {
    uint4 a = s[i], b = s[i + st], c = s[i + 2 * st], e = s[i + 3 * st];
    d[i] = a; d[i + st] = b; d[i + 2 * st] = c; d[i + 3 * st] = e; }
  for (; i < n16; i += st) d[i] = s[i];
}
extern "C" __global__ void v3(const uint4* __restrict__ s0, uint4* __restrict__ d0,
                              const long long* ids, long long n16) {
  // each block copies one contiguous chunk of n16/gridDim.x, 8 loads in flight per thread
  const uint4* s = s0 + ids[blockIdx.y] * n16; uint4* d = d0 + (long long)blockIdx.y * n16;
  long long chunk = (n16 + gridDim.x - 1) / gridDim.x, lo = blockIdx.x * chunk,
            hi = min(lo + chunk, n16);
  long long i = lo + threadIdx.x; const long long st = blockDim.x;
  for (; i + 7 * st < hi; i += 8 * st) { uint4 r[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) r[k] = s[i + k * st];
#pragma unroll
    for (int k = 0; k < 8; ++k) d[i + k * st] = r[k]; }
  for (; i < hi; i += st) d[i] = s[i];
}
"""


def registered_host_buffer(nbytes: int) -> np.ndarray:
    """`nbytes` of host memory holding a byte pattern, registered with CUDA (flags 0: page-locked;
    with unified addressing, kernels read it through its host pointer)."""
    buf = np.empty(nbytes, dtype=np.uint8)
    buf[:] = np.arange(nbytes, dtype=np.uint64).astype(np.uint8)
    status = torch.cuda.cudart().cudaHostRegister(buf.ctypes.data, nbytes, 0)
    if int(getattr(status, "value", status)) != 0:
        raise RuntimeError(f"cudaHostRegister failed: {status}")
    return buf


def median_ms(fn: Callable[[], None], reps: int = 10) -> float:
    """Median milliseconds of `fn` on the current stream (CUDA events), after one warm-up."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def gbps(fn: Callable[[], None]) -> float:
    """GB/s of `fn` moving the 8 expert blocks (bytes per ms / 1e6)."""
    return 8 * BLOCK_BYTES / median_ms(fn) / 1e6


def memcpy_rates(src: torch.Tensor, dst: torch.Tensor) -> dict[str, float]:
    """torch's non-blocking copies: one per expert block, and one of 8 contiguous blocks."""
    blk = BLOCK_BYTES

    def memcpy8() -> None:
        for j, i in enumerate(EXPERT_IDS):
            dst[j * blk : (j + 1) * blk].copy_(src[i * blk : (i + 1) * blk], non_blocking=True)

    def memcpy1() -> None:
        dst.copy_(src[: 8 * blk], non_blocking=True)

    return {"memcpy8": gbps(memcpy8), "memcpy_one_75MB": gbps(memcpy1)}


def kernel_rate(cupy: Any, kernel: Any, stream: Any, grid_x: int, threads: int,
                src_ptr: int, dst: torch.Tensor, ids: torch.Tensor, n16: int) -> float:
    """GB/s of `kernel` over grid `(grid_x, 8)` with `threads` threads per block."""

    def launch() -> None:
        with stream:
            kernel((grid_x, 8), (threads,), (cupy.uint64(src_ptr), cupy.uint64(dst.data_ptr()),
                                             cupy.uint64(ids.data_ptr()), cupy.int64(n16)))

    return gbps(launch)


def run() -> dict[str, Any]:
    """Every measurement; returns the JSON record."""
    try:
        import cupy
    except ImportError:
        sys.exit("mapped_read: CuPy is missing (pip install cupy-cuda12x or cupy-cuda13x)")

    blk = BLOCK_BYTES
    buf = registered_host_buffer(NUM_EXPERTS * blk)
    ptr = buf.ctypes.data
    src = torch.from_numpy(buf)  # [bytes] shares `buf`, keeping it alive
    dst = torch.empty(8 * blk, dtype=torch.uint8, device="cuda")
    ids = torch.tensor(EXPERT_IDS, device="cuda")
    n16 = blk // 16
    module = cupy.RawModule(code=KERNEL_SOURCE)
    record: dict[str, Any] = memcpy_rates(src, dst)
    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)
    for name in KERNELS:
        kernel = module.get_function(name)
        for grid_x in GRID_X:
            for threads in THREADS:
                record[f"{name}_{grid_x}_{threads}"] = kernel_rate(
                    cupy, kernel, stream, grid_x, threads, ptr, dst, ids, n16)
        # destination block 5 holds expert 10
        record[f"{name}_ok"] = torch.equal(dst.view(8, -1)[5].cpu(), src[10 * blk : 11 * blk])
    rates = ((v, k) for k, v in record.items() if isinstance(v, float))
    record["best"] = sorted(rates, reverse=True)[:8]
    return record


def main() -> None:
    """Parse arguments, measure, print and write the JSON record."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path,
                        default=Path(os.environ.get("OUT", ".")) / "mapped_read.json",
                        help="write the JSON record here (default: $OUT/mapped_read.json, "
                             "or ./mapped_read.json without OUT)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("mapped_read: needs a CUDA GPU")
    record = run()
    print(json.dumps(record, indent=0))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
