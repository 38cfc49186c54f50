"""Host-to-GPU copy bandwidth: raw torch copies against our CudaCopyEngine, and demand overtaking.

Run on the GPU machine (needs CuPy):
    PYTHONPATH=packages/moe-core/src python3 benchmarks/copy_bandwidth.py --out $OUT/copy.json

What it measures (issue #4's first acceptance line):
1. Raw pinned host->device bandwidth with torch (`copy_(non_blocking=True)` from a pinned tensor,
   CUDA events, median of repeats) per block size, and pageable bandwidth at one size.
2. The engine's bandwidth on the demand lane for the same sizes, ratio to raw (acceptance: >= 0.9).
   Both are measured "gated": the copy stream first waits for a GPU sleep while the host enqueues
   the whole batch, so the figure is the device's transfer rate, not Python's enqueue rate. The
   engine is also measured "host-fed" (no gate, demand lane; and prefetch lane topped up by a
   `poll` loop), which includes our per-copy Python cost.
3. Overtaking: 8 x 64 MB prefetches queued, then one demand copy; its host-observed latency
   (submit to landed) against the same copy alone, and against a window holding all 8 prefetches
   (what a plain FIFO stream would do).
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

MB = 2**20
SIZES_MB = (1, 4, 16, 64, 350)
BATCH_BYTES = 256 * MB  # copies per timed batch: enough to make 1 MB copies measurable
SLEEP_CYCLES = 100_000_000  # ~50 ms GPU sleep gating a batch while the host enqueues it


def gbps(nbytes: int, seconds: float) -> float:
    """Gigabytes (1e9) per second."""
    return nbytes / seconds / 1e9 if seconds > 0 else float("nan")


def batch_count(size: int) -> int:
    """Copies per timed batch of blocks of `size` bytes."""
    return max(1, BATCH_BYTES // size)


def torch_bandwidth(src: torch.Tensor, dst: torch.Tensor, size: int, repeats: int,
                    gated: bool = True) -> float:
    """Median GB/s of batches of back-to-back `size`-byte copies on a side stream."""
    count = min(batch_count(size), src.numel() // size)
    stream = torch.cuda.Stream()
    results = []
    for _ in range(repeats + 1):  # the first batch warms up
        if gated:
            torch.cuda._sleep(SLEEP_CYCLES)
            stream.wait_stream(torch.cuda.current_stream())
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            start.record()
            for i in range(count):
                dst[i * size : (i + 1) * size].copy_(src[i * size : (i + 1) * size],
                                                     non_blocking=True)
            end.record()
        end.synchronize()
        results.append(gbps(count * size, start.elapsed_time(end) / 1e3))
    return statistics.median(results[1:])


def engine_bandwidth(engine: Any, cupy: Any, src: torch.Tensor, dst: torch.Tensor, size: int,
                     repeats: int, lane: Any, gated: bool) -> tuple[float, float]:
    """Median `(device GB/s, host-observed GB/s)` of batches through `engine` on `lane`.

    Device GB/s is timed from the first copy's start event to the last copy's end event.
    """
    from moe_core.offload.copy_engine import CopyLane

    count = min(batch_count(size), src.numel() // size)
    device_rates, host_rates = [], []
    for _ in range(repeats + 1):
        if gated:
            torch.cuda._sleep(SLEEP_CYCLES)
            engine.fence_current_stream()
        t0 = time.perf_counter()
        tickets = [engine.submit(src[i * size : (i + 1) * size], dst[i * size : (i + 1) * size],
                                 lane) for i in range(count)]
        if lane is CopyLane.PREFETCH:
            while engine.queued:  # the consumer's calls top the window up; here, a poll loop
                engine.poll()
        tickets[-1].handle.end.synchronize()
        host_s = time.perf_counter() - t0
        device_ms = cupy.cuda.get_elapsed_time(tickets[0].handle.start, tickets[-1].handle.end)
        device_rates.append(gbps(count * size, device_ms / 1e3))
        host_rates.append(gbps(count * size, host_s))
        engine.drain()
    return statistics.median(device_rates[1:]), statistics.median(host_rates[1:])


def overtaking(cupy: Any, src: torch.Tensor, dst: torch.Tensor, repeats: int) -> dict[str, float]:
    """Latency (ms, host-observed) of a 64 MB demand copy alone, behind 8 x 64 MB prefetches
    with the default window, and behind the same prefetches all enqueued on the stream."""
    from moe_core.offload.copy_engine import CopyLane
    from moe_core.offload.cuda_copy_engine import CudaCopyEngine

    size = 64 * MB
    block = [(src[i * size : (i + 1) * size], dst[i * size : (i + 1) * size]) for i in range(9)]

    def demand_latency(engine: CudaCopyEngine, prefetches: int) -> float:
        times = []
        for _ in range(repeats + 1):
            for i in range(prefetches):
                engine.submit(*block[i], CopyLane.PREFETCH)
            t0 = time.perf_counter()
            ticket = engine.submit(*block[8], CopyLane.DEMAND)
            ticket.handle.end.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
            engine.drain()
        return statistics.median(times[1:])

    windowed, fifo = CudaCopyEngine("cuda"), CudaCopyEngine("cuda", prefetch_window=8)
    result = {"demand_mb": 64.0, "prefetches": 8, "prefetch_mb": 64.0,
              "alone_ms": demand_latency(windowed, 0),
              "behind_prefetches_ms": demand_latency(windowed, 8),
              "behind_all_enqueued_ms": demand_latency(fifo, 8)}
    windowed.close()
    fifo.close()
    return result


def run(sizes_mb: tuple[int, ...], repeats: int) -> dict[str, Any]:
    """Every measurement; returns the JSON record."""
    try:
        import cupy
    except ImportError:
        sys.exit("copy_bandwidth: CuPy is missing (pip install cupy-cuda12x or cupy-cuda13x)")
    from moe_core.offload.copy_engine import CopyLane
    from moe_core.offload.cuda_copy_engine import CudaCopyEngine

    started = time.perf_counter()
    largest = max(max(sizes_mb) * MB, BATCH_BYTES, 9 * 64 * MB)
    src = torch.empty(largest, dtype=torch.uint8, pin_memory=True)  # [bytes]
    src.random_(0, 256)
    dst = torch.empty(largest, dtype=torch.uint8, device="cuda")
    pageable = torch.empty(64 * MB, dtype=torch.uint8).random_(0, 256)
    engine = CudaCopyEngine("cuda")
    rows = []
    for mb in sizes_mb:
        size = mb * MB
        raw = torch_bandwidth(src, dst, size, repeats)
        gated, _ = engine_bandwidth(engine, cupy, src, dst, size, repeats, CopyLane.DEMAND, True)
        fed_dev, fed_host = engine_bandwidth(engine, cupy, src, dst, size, repeats,
                                             CopyLane.DEMAND, False)
        pre_dev, _ = engine_bandwidth(engine, cupy, src, dst, size, repeats,
                                      CopyLane.PREFETCH, False)
        rows.append({"size_mb": mb, "copies_per_batch": batch_count(size),
                     "raw_pinned_gbps": raw, "engine_gbps": gated, "ratio": gated / raw,
                     "engine_host_fed_device_gbps": fed_dev, "engine_host_fed_host_gbps": fed_host,
                     "engine_prefetch_polled_gbps": pre_dev, "prefetch_ratio": pre_dev / raw})
    pageable_gbps = torch_bandwidth(pageable, dst, 64 * MB, max(2, repeats // 2), gated=False)
    engine.close()
    over = overtaking(cupy, src, dst, repeats)
    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "cupy": cupy.__version__, "repeats": repeats, "mb": MB,
            "pageable_64mb_gbps": pageable_gbps, "sizes": rows, "overtaking": over,
            "acceptance_ratio_min": min(r["ratio"] for r in rows),
            "acceptance_met": all(r["ratio"] >= 0.9 for r in rows),
            "wall_s": time.perf_counter() - started}


def table(record: dict[str, Any]) -> str:
    """A compact text summary of `record`."""
    lines = [f"{record['device']}  pageable 64 MB: {record['pageable_64mb_gbps']:.1f} GB/s",
             f"{'MB':>5} {'raw GB/s':>9} {'engine':>7} {'ratio':>6} {'fed dev':>8} "
             f"{'fed host':>9} {'prefetch':>9} {'ratio':>6}"]
    for r in record["sizes"]:
        lines.append(f"{r['size_mb']:>5} {r['raw_pinned_gbps']:>9.1f} {r['engine_gbps']:>7.1f} "
                     f"{r['ratio']:>6.3f} {r['engine_host_fed_device_gbps']:>8.1f} "
                     f"{r['engine_host_fed_host_gbps']:>9.1f} "
                     f"{r['engine_prefetch_polled_gbps']:>9.1f} {r['prefetch_ratio']:>6.3f}")
    o = record["overtaking"]
    lines.append(f"demand 64 MB: alone {o['alone_ms']:.2f} ms, behind 8x64 MB prefetches "
                 f"{o['behind_prefetches_ms']:.2f} ms (all enqueued: "
                 f"{o['behind_all_enqueued_ms']:.2f} ms)")
    verdict = "met" if record["acceptance_met"] else "NOT met"
    lines.append(f"acceptance (engine >= 0.9 x raw pinned): {verdict}, "
                 f"min ratio {record['acceptance_ratio_min']:.3f}; {record['wall_s']:.1f} s")
    return "\n".join(lines)


def main() -> None:
    """Parse arguments, measure, write JSON, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the JSON record here")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=list(SIZES_MB))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("copy_bandwidth: needs a CUDA GPU")
    record = run(tuple(args.sizes_mb), args.repeats)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(record))
    print(table(record))


if __name__ == "__main__":
    main()
