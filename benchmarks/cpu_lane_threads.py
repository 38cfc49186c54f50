"""Why the CPU lane's numba kernel reads cold experts at half its main-thread rate (issue 15):
the kernel on cold S3 experts (4 experts x 1 token, 9 MiB each) from the main thread and from a
thread of its own, with 16 and 15 numba threads, under each threading layer that imports, each
variant in a fresh process (the threading layer is chosen at numba's first parallel call).

    PYTHONPATH=packages/moe-core/src python3 benchmarks/cpu_lane_threads.py --out $OUT/threads.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any


def measure(where: str, threads: int) -> dict[str, Any]:
    """One variant, in this process."""
    import numba
    import torch
    from moe_core.offload.cpu_experts import NumbaCpuExperts, time_cpu_kernel
    from moe_core.offload.layout import ExpertLayout

    layout = ExpertLayout(2048, 768, torch.bfloat16)
    blocks = torch.zeros(96, layout.nbytes // 2, dtype=torch.bfloat16,
                         pin_memory=torch.cuda.is_available())
    for row in blocks:  # first touch; weights of a dummy checkpoint's scale
        row.copy_(torch.randn(row.shape) * 0.02)
    out: dict[str, Any] = {}

    def run() -> None:
        numba.set_num_threads(threads)
        kernel = NumbaCpuExperts()
        timings = [time_cpu_kernel(kernel, blocks, layout, 4, 1, repeats=7).gb_per_s
                   for _ in range(3)]
        out["gbps"] = timings
        out["layer"] = numba.threading_layer()

    if where in ("main", "main+pcie"):
        if where == "main+pcie":  # the GPU reads other pinned memory all along (DRAM shared)
            source = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
            sink = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream):
                for _ in range(60):
                    sink.copy_(source, non_blocking=True)
            start = torch.cuda.Event(enable_timing=True)
            start.record(stream)
        run()
        if where == "main+pcie":
            end = torch.cuda.Event(enable_timing=True)
            end.record(stream)
            torch.cuda.synchronize()
            out["pcie_gbps_all_copies"] = 60 * (1 << 30) / (start.elapsed_time(end) / 1e3) / 1e9
    else:
        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
    out["affinity"] = len(os.sched_getaffinity(0))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path)
    p.add_argument("--one", nargs=2, metavar=("WHERE", "THREADS"),
                   help="one variant in this process: main, thread or main+pcie; threads")
    a = p.parse_args()
    if a.one:
        print(json.dumps(measure(a.one[0], int(a.one[1]))))
        return
    results = []
    variants = [(layer, where, threads) for layer in ("omp", "workqueue")
                for where in ("main", "thread") for threads in (16, 15)]
    variants += [("omp", "main+pcie", 16), ("tbb", "main", 16)]
    for layer, where, threads in variants:
        env = dict(os.environ, NUMBA_THREADING_LAYER=layer)
        proc = subprocess.run([sys.executable, __file__, "--one", where, str(threads)],
                              capture_output=True, text=True, env=env, timeout=120)
        row: dict[str, Any] = {"layer_asked": layer, "where": where, "threads": threads}
        try:
            row.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        except (IndexError, json.JSONDecodeError):
            row["error"] = proc.stderr.strip().splitlines()[-1:]
        results.append(row)
        print(row, flush=True)
        if a.out:
            a.out.write_text(json.dumps(results, indent=1))

if __name__ == "__main__":
    main()
