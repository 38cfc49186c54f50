"""Where the time of profiled decode steps went: a `torch.profiler` chrome trace of a few steps,
summarised per step (the host-to-device link's busy time and bytes per stream, kernels, device
idle time, and where the host blocked). Used by `moe_gen_s1.py --trace` and
`moe_gen_variants.py --trace`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

__all__ = ["MAPPED_READ_KERNELS", "profile_steps", "trace_summary", "union_s"]

MAPPED_READ_KERNELS = frozenset({"gather_rows", "fetch_rows"})


def union_s(spans: Iterable[tuple[float, float]]) -> float:
    """Seconds covered by the union of `(start_us, end_us)` spans."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total / 1e6


def _overlap_s(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Seconds where some span of `a` and some span of `b` run at once."""
    marks = sorted([(s, 0, 1) for s, _ in a] + [(e, 0, -1) for _, e in a]
                   + [(s, 1, 1) for s, _ in b] + [(e, 1, -1) for _, e in b])
    depth, total, last = [0, 0], 0.0, 0.0
    for t, which, delta in marks:
        if depth[0] > 0 and depth[1] > 0:
            total += t - last
        depth[which] += delta
        last = t
    return total / 1e6


def trace_summary(trace: dict[str, Any], num_steps: int) -> dict[str, Any]:
    """Where the time of `num_steps` profiled steps went, from a chrome trace of
    `torch.profiler` (CUDA activity and the host's runtime calls), per step: how long the
    host-to-device link was busy and with what (KV on the KV mover's stream, experts on the copy
    engine's), how long kernels ran, how long both lanes overlapped, and where the host blocked."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not gpu:
        return {"error": "no device activity in the trace"}

    def spans(evs: list[dict[str, Any]]) -> list[tuple[float, float]]:
        return [(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in evs]

    h2d = [e for e in gpu if e["cat"] == "gpu_memcpy" and "HtoD" in e["name"]]
    kernels = [e for e in gpu if e["cat"] == "kernel"]
    # Kernels that read pinned host memory over the link themselves (moe_core's mapped KV
    # gather and mapped expert fetch): the link is busy while they run, with no memcpy.
    mapped = [e for e in kernels if e["name"] in MAPPED_READ_KERNELS]
    origin = min(s for s, _ in spans(gpu))  # the first device activity
    span_s = union_s([(origin, max(e for _, e in spans(gpu)))])
    streams: dict[str, dict[str, float]] = {}
    for e in h2d:
        row = streams.setdefault(str(e.get("args", {}).get("stream")),
                                 {"busy_s": 0.0, "bytes": 0.0, "copies": 0})
        row["busy_s"] += e["dur"] / 1e6 / num_steps
        row["bytes"] += float(e.get("args", {}).get("bytes", 0)) / num_steps
        row["copies"] += 1 / num_steps
    by_stream = {k: spans([e for e in h2d if str(e.get("args", {}).get("stream")) == k])
                 for k in streams}
    heavy = sorted(streams, key=lambda k: -streams[k]["bytes"])[:2]
    host: dict[str, float] = {}
    for e in events:
        name = e["name"]
        if e.get("cat") == "cuda_runtime" and ("Synchronize" in name or "Memcpy" in name):
            host[name] = host.get(name, 0.0) + e["dur"] / 1e6 / num_steps
        if e.get("cat") == "cpu_op" and name in ("aten::index_select", "aten::nonzero",
                                                 "aten::_local_scalar_dense", "aten::item",
                                                 "aten::pin_memory", "aten::index_copy_"):
            host[name] = host.get(name, 0.0) + e["dur"] / 1e6 / num_steps
    h2d_bytes = sum(r["bytes"] for r in streams.values())
    busy = union_s(spans(h2d)) / num_steps
    # Link idle gaps (copies and mapped reads): many short ones point at the host issuing
    # copies too slowly (per-expert work), long ones at phases with nothing to copy
    # (attention, step boundaries).
    link = spans(h2d) + spans(mapped)
    link_busy = union_s(link) / num_steps
    gaps, at, reach = [], [], None
    for start, end in sorted(link):
        if reach is not None and start > reach:
            gaps.append((start - reach) / 1e6)
            at.append((reach - origin) / 1e6)
        reach = end if reach is None else max(reach, end)
    short = [g for g in gaps if g < 1e-3]
    # The longest idle stretches of the link and where they began (seconds from the first
    # device activity): step boundaries and phases with nothing to copy show up here.
    longest = sorted(zip(gaps, at, strict=True), reverse=True)[:12]
    return {"steps": num_steps, "gpu_span_s": span_s / num_steps,
            "h2d_busy_s": busy, "h2d_busy_share": busy * num_steps / span_s,
            "h2d_bytes": h2d_bytes, "h2d_rate_while_busy": h2d_bytes / busy if busy else None,
            "h2d_streams": streams,
            "mapped_read_busy_s": union_s(spans(mapped)) / num_steps,
            "link_busy_s": link_busy, "link_busy_share": link_busy * num_steps / span_s,
            "link_longest_idle": [{"at_s": a, "idle_s": g} for g, a in longest],
            "link_idle_under_1ms_s": sum(short) / num_steps,
            "link_idle_gaps_under_1ms": len(short) / num_steps,
            "link_idle_over_1ms_s": (sum(gaps) - sum(short)) / num_steps,
            "two_heaviest_h2d_streams_overlap_s": (
                _overlap_s(by_stream[heavy[0]], by_stream[heavy[1]]) / num_steps
                if len(heavy) == 2 else 0.0),
            "kernel_busy_s": union_s(spans(kernels)) / num_steps,
            "device_idle_s": (span_s - union_s(spans(gpu))) / num_steps,
            "host_s": host}


def profile_steps(run: Any, num_steps: int, path: Path | None = None) -> dict[str, Any]:
    """Run `run()` (which runs `num_steps` steps) under `torch.profiler`; summarise the trace
    (and keep it gzipped at `path`)."""
    import gzip
    import tempfile

    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        run()
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(file))
        raw = file.read_bytes()
    if path is not None:
        path.write_bytes(gzip.compress(raw))
    summary = trace_summary(json.loads(raw), num_steps)
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    summary["top_host_ops_per_step"] = [  # where the host's time went, by operation
        {"name": e.key, "calls": e.count / num_steps,
         "self_cpu_ms": e.self_cpu_time_total / 1e3 / num_steps} for e in ops[:30]]
    return summary

