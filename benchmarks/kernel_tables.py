"""Per-step tables of a `torch.profiler` chrome trace over a window of marked steps: each
device operation (kernel, copy, memset) and each host operation by name, with its calls and
microseconds per step, and the totals. Used by `pass_kernels.py`.

Steps are marked on the host by a `record_function(STEP_MARK)` range that starts with each
step. A window is `num_steps` consecutive steps from the `first` marked one: from that step's
start to the start of the step after the window. A device operation belongs to the window when
the host call that launched it ran inside it (CUPTI gives a kernel launched by a CUDA graph
replay the `cudaGraphLaunch` call's correlation id), not when it ran on the device: a step
that enqueues the next step's pass before it waits for its own (the serving engine's
overlapped steps) then counts exactly one pass per step, and a kernel still running when the
window ends is counted whole. An operation whose launch is not in the trace is placed by its
own start.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from step_trace import union_s

__all__ = ["STEP_MARK", "Window", "device_table", "diff_table", "host_table", "step_window",
           "window_tables"]

STEP_MARK = "pass_kernels.step"
"""The name of the `record_function` range that starts each step."""
DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_CATEGORIES = ("cpu_op", "cuda_runtime", "cuda_driver")
"""Host events tabled: operators and the CUDA calls they make (launches, synchronisation)."""

Event = dict[str, Any]
Row = dict[str, Any]


@dataclass(frozen=True)
class Window:
    """A window of marked steps.

    Attributes:
        start_us: The first step's start (trace clock, microseconds).
        end_us: The start of the step after the last one.
        num_steps: Steps in the window.
        wall_us: The time from each step's start to the next one's (`num_steps` values).
    """

    start_us: float
    end_us: float
    num_steps: int
    wall_us: tuple[float, ...]

    def holds(self, ts_us: float) -> bool:
        """Whether `ts_us` is inside the window."""
        return self.start_us <= ts_us < self.end_us


def complete_events(trace: dict[str, Any]) -> list[Event]:
    """The trace's complete (`ph: X`) events with a duration."""
    return [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]


def step_window(events: list[Event], first: int, num_steps: int) -> Window:
    """The window of `num_steps` steps from marked step `first` (0: the first marked).

    Raises:
        ValueError: fewer than `first + num_steps + 1` marked steps (the step after the window
            marks its end).
    """
    starts = sorted(float(e["ts"]) for e in events
                    if e.get("cat") == "user_annotation" and e.get("name") == STEP_MARK)
    if len(starts) < first + num_steps + 1:
        raise ValueError(f"the trace marks {len(starts)} steps; a window of {num_steps} from "
                         f"step {first} needs {first + num_steps + 1}")
    marks = starts[first:first + num_steps + 1]
    return Window(marks[0], marks[-1], num_steps,
                  tuple(b - a for a, b in pairwise(marks)))


def _launch_times(events: list[Event]) -> dict[int, float]:
    """Correlation id -> start of the host call (runtime or driver) that launched it."""
    return {int(e["args"]["correlation"]): float(e["ts"]) for e in events
            if e.get("cat") in ("cuda_runtime", "cuda_driver")
            and "correlation" in e.get("args", {})}


def _rows(totals: dict[tuple[str, str], list[float]], num_steps: int) -> list[Row]:
    """Table rows from `(name, category) -> [calls, microseconds]`, most time first."""
    whole = sum(us for _, us in totals.values()) or 1.0
    rows = [{"name": name, "category": category, "calls_per_step": calls / num_steps,
             "us_per_step": us / num_steps, "us_per_call": us / calls if calls else 0.0,
             "share": us / whole}
            for (name, category), (calls, us) in totals.items()]
    return sorted(rows, key=lambda r: -r["us_per_step"])


def device_table(events: list[Event], window: Window) -> tuple[list[Row], dict[str, float]]:
    """The device operations launched in `window`, per name, and their totals per step:
    `kernel_us`, `memcpy_us`, `memset_us` (summed durations), `busy_us` (the union of their
    spans: time the device ran something), the counts (`kernels`, `memcpys`, `memsets`), and
    `unplaced` (operations placed by their own start: their launch is not in the trace)."""
    launches = _launch_times(events)
    totals: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0])
    spans = []
    unplaced = 0
    for e in events:
        category = e.get("cat")
        if category not in DEVICE_CATEGORIES:
            continue
        correlation = e.get("args", {}).get("correlation")
        launched = launches.get(int(correlation)) if correlation is not None else None
        if launched is None:
            unplaced += 1
            launched = float(e["ts"])
        if not window.holds(launched):
            continue
        row = totals[(str(e["name"]), str(category))]
        row[0] += 1
        row[1] += float(e["dur"])
        spans.append((float(e["ts"]), float(e["ts"]) + float(e["dur"])))
    n = window.num_steps
    summary = {"busy_us": union_s(spans) * 1e6 / n, "unplaced": float(unplaced)}
    for category, key in zip(DEVICE_CATEGORIES, ("kernel", "memcpy", "memset"), strict=True):
        rows = [v for (_, c), v in totals.items() if c == category]
        summary[f"{key}_us"] = sum(us for _, us in rows) / n
        summary[f"{key}s"] = sum(calls for calls, _ in rows) / n
    return _rows(totals, n), summary


def host_table(events: list[Event], window: Window) -> list[Row]:
    """The host operations that started in `window`, per name, by self time (less the time of
    the operations nested in them on the same thread)."""
    by_thread: dict[Any, list[Event]] = defaultdict(list)
    for e in events:
        if e.get("cat") in (*HOST_CATEGORIES, "user_annotation"):
            by_thread[(e.get("pid"), e.get("tid"))].append(e)
    totals: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0])
    for thread_events in by_thread.values():
        thread_events.sort(key=lambda e: (float(e["ts"]), -float(e["dur"])))
        stack: list[tuple[float, int]] = []  # (end, index) of the open events
        nested = [0.0] * len(thread_events)
        for i, e in enumerate(thread_events):
            start, dur = float(e["ts"]), float(e["dur"])
            while stack and stack[-1][0] <= start:
                stack.pop()
            if stack:
                nested[stack[-1][1]] += dur
            stack.append((start + dur, i))
        for e, inner in zip(thread_events, nested, strict=True):
            if e.get("cat") in HOST_CATEGORIES and window.holds(float(e["ts"])):
                row = totals[(str(e["name"]), str(e["cat"]))]
                row[0] += 1
                row[1] += max(0.0, float(e["dur"]) - inner)
    return _rows(totals, window.num_steps)


def window_tables(trace: dict[str, Any], first: int, num_steps: int) -> dict[str, Any]:
    """Everything `pass_kernels.py` records of one side's trace: the window's wall time per
    step, the device table and its totals, the host table."""
    events = complete_events(trace)
    window = step_window(events, first, num_steps)
    devices, totals = device_table(events, window)
    hosts = host_table(events, window)
    wall = sorted(window.wall_us)
    launches = sum(r["calls_per_step"] for r in hosts if r["name"] == "cudaGraphLaunch")
    return {"steps": num_steps,
            "wall_ms_per_step_median": wall[len(wall) // 2] / 1e3,
            "wall_ms_per_step_mean": sum(wall) / len(wall) / 1e3,
            "wall_ms_each_step": [w / 1e3 for w in window.wall_us],
            "kernel_ms_per_step": totals["kernel_us"] / 1e3,
            "memcpy_ms_per_step": totals["memcpy_us"] / 1e3,
            "memset_ms_per_step": totals["memset_us"] / 1e3,
            "device_busy_ms_per_step": totals["busy_us"] / 1e3,
            "kernels_per_step": totals["kernels"], "memcpys_per_step": totals["memcpys"],
            "memsets_per_step": totals["memsets"], "graph_launches_per_step": launches,
            "device_ops_placed_by_start": int(totals["unplaced"]),
            "device_ops": devices, "host_ops": hosts}


def diff_table(a: list[Row], b: list[Row], names: tuple[str, str], top: int = 40
               ) -> list[Row]:
    """The operations (by name and category) whose microseconds per step differ most between
    tables `a` and `b` (called `names`), largest difference first."""
    keyed = [{(r["name"], r["category"]): r for r in table} for table in (a, b)]
    rows = []
    for key in {*keyed[0], *keyed[1]}:
        sides = [table.get(key) for table in keyed]
        us = [s["us_per_step"] if s else 0.0 for s in sides]
        calls = [s["calls_per_step"] if s else 0.0 for s in sides]
        rows.append({"name": key[0], "category": key[1],
                     f"{names[0]}_us_per_step": us[0], f"{names[1]}_us_per_step": us[1],
                     "diff_us_per_step": us[0] - us[1],
                     f"{names[0]}_calls_per_step": calls[0],
                     f"{names[1]}_calls_per_step": calls[1]})
    rows.sort(key=lambda r: (-abs(r["diff_us_per_step"]), r["name"]))
    return rows[:top]
