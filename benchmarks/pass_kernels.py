"""What the device runs per decode step at batch 1: the serving engine's captured decode pass
against moe-core's `DecodeRunner` step, kernel by kernel, on one model in one process.

Why: at S3 with FP8 experts on the H200 the runner's captured step takes 2.4-3.5 ms per token
(`two_lane_decode.py --sections s3 --runs 1x1 --expert-dtype fp8`) and the serving engine's
3.53 ms per step, 2.96 ms of it the engine thread waiting for the GPU
(`engine_host_time.py ... --expert-dtype fp8`): its captured pass is about 1 ms slower on
the device for the same model. Suspects: paged attention over 256-slot past buckets (the
runner reads a static KV cache), the live tracer's counting and lookahead captured in the
graph, and other per-pass index work. This script names the kernels that differ.

    PYTHONPATH=packages/moe-core/src:packages/moe-infinity/src \
        python3 benchmarks/pass_kernels.py --out $OUT/pass-kernels.json --keep-traces

(one load of the model, 20-40 s at S3, then a few seconds of decoding per side; written before
its first GPU run).

The engine is the one `moe-infinity serve` runs, built from serve's options as
`engine_host_time.py` builds it (the defaults are S3's serving run: `--device cuda --model
qwen3-30b-a3b --dummy --num-layers 24 --gpu-memory 16GiB --kv-memory 576MiB --policy lru
--fetch mapped --routing uniform`, with `--expert-dtype fp8`; decode captured, steps
overlapped). It serves one short request (warm-up: the graphs of both past buckets are
captured), then one greedy request of a `--prompt-tokens` prompt (token ids 1..N) with EOS
ignored. After `--warmup` decode steps, `torch.profiler` (CPU and CUDA activity: CUPTI records
the kernels of graph replays as ordinary kernels) runs inside the engine thread over
`--steps` decode steps and a margin of 2 before them. Then the runner decodes on the same
model instance, its weights, expert slots and offload runtime (so the slots and what they
hold are the engine's: any difference is the pass's, not the cache's), at batch 1 with the
engine's lanes (`--lanes`, one by default), captured, under the same routing, as
`two_lane_decode.py`'s `run` drives it (prefill, then `step` and a synchronise per token),
profiled the same way.

Per side the JSON holds: wall time between step starts (median, mean; profiled, and the
unprofiled steps before the window), device time per step (kernels summed, copies, memsets,
the device's busy time), kernels, copies and graph launches per step, each device operation
by name (calls and microseconds per step, most time first), the host operations by self time,
and the offload counters per pass (hits, misses, mapped bytes). `diff` lists the device
operations whose time per step differs most (engine minus runner). A device operation counts
in the step whose host work launched it (`kernel_tables.py`): the engine's step n enqueues
pass n+1 before it waits for pass n, so each step counts exactly one pass.
`--keep-traces` keeps both chrome traces gzipped next to the JSON. `--smoke` runs on the CPU
with the embedded tiny model (no kernels there: the tables are the CPU operators).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from engine_host_time import add_serve_options, engine_settings, run_request
from kernel_tables import STEP_MARK, diff_table, window_tables
from run_commit import commit

MARGIN_STEPS = 2
"""Profiled steps before the window (the profiler's start-up settles in them)."""
S3_SERVE = {"device": "cuda", "model": "qwen3-30b-a3b", "dummy": True, "num_layers": 24,
            "gpu_memory": "16GiB", "kv_memory": "576MiB", "policy": "lru", "fetch": "mapped",
            "routing": "uniform"}
"""serve's options of the S3 serving runs (`engine_host_time.py`, `serve_sweep.py`)."""
SMOKE_SERVE = {"device": "cpu", "model": "tiny-moe", "dummy": False, "num_layers": None,
               "gpu_memory": "16MiB", "kv_memory": "1MiB"}
"""The embedded model with about half its experts in slots (the mapped path's misses run)."""
SIDES = ("engine", "runner")
TOP = 15


class StepWindow:
    """Profiles decode steps `first .. last` (counted from 0) of whatever runs them through
    `run`, from the thread that runs them, each step's start marked for `kernel_tables`; the
    offload counters are read at the start of step `first` and of the step after `last`.

    Attributes:
        steps: Steps in the measured window (after `MARGIN_STEPS` profiled ones).
        starts_s: Each step's start (`time.perf_counter`).
        profiler: The profiler, once started.
        before: The offload counters at the start of step `first`.
        after: Those at the start of the step after `last`.
    """

    def __init__(self, runtime: Any, activities: list[Any], skip: int, steps: int) -> None:
        self.steps = steps
        self.first, self.last = skip, skip + MARGIN_STEPS + steps
        self.starts_s: list[float] = []
        self.profiler: Any = None
        self.before: Any = None
        self.after: Any = None
        self._runtime = runtime
        self._activities = activities

    @property
    def total_steps(self) -> int:
        """Decode steps needed: up to the one after the window, which reads the counters."""
        return self.last + 2

    @property
    def done(self) -> bool:
        """Whether the window has been profiled and its counters read."""
        return self.after is not None

    def run(self, step: Callable[[], object]) -> None:
        """Run the next decode step."""
        i = len(self.starts_s)
        if i == self.first:
            self.before = self._counters()
            self.profiler = torch.profiler.profile(activities=self._activities)
            self.profiler.start()
        elif i == self.last + 1:
            self.after = self._counters()
        self.starts_s.append(time.perf_counter())
        with torch.profiler.record_function(STEP_MARK):
            step()
        if i == self.last:
            self.profiler.stop()

    def unprofiled_ms(self) -> float:
        """Median milliseconds between the starts of the decode steps before the profiled ones
        (the first two left out)."""
        starts = self.starts_s[2:self.first]
        return 1e3 * statistics.median(b - a for a, b in pairwise(starts))

    def _counters(self) -> Any:
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the passes enqueued so far are counted
        return self._runtime.snapshot(block=True)


def activities_for(device: str) -> list[Any]:
    """The profiler's activities on `device`, the profiler started once on this thread first
    (the profiler's set-up, which must run on the thread that loaded it, stays out of the
    windows, which the engine's profiles from its own thread).

    CUPTI stays attached between the three sessions (`TEARDOWN_CUPTI=0`, unless set
    otherwise): re-attaching it after a teardown has crashed processes that replay CUDA graphs
    (torch's profiler sets the same for its own graphs on older CUDA). Its callbacks then
    cost the host a little on each CUDA call of the unprofiled steps too."""
    os.environ.setdefault("TEARDOWN_CUPTI", "0")
    found = [torch.profiler.ProfilerActivity.CPU]
    if device.startswith("cuda"):
        found.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=found):
        torch.zeros(1, device=device).add_(1)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return found


def profile_engine(engine: Any, prompt: tuple[int, ...], window: StepWindow) -> None:
    """One warm-up request, then the measured one with `window` over its decode steps (a
    decode step: no arrival, no prompt left to prefill)."""
    from moe_infinity.serving.request import GenerationRequest

    original = engine._step  # the engine thread's step (engine_host_time wraps it the same way)
    armed = threading.Event()
    scheduler = engine.scheduler

    def step(arrivals: list[Any], cancels: set[str]) -> None:
        running = scheduler.running
        if (not armed.is_set() or arrivals or cancels or not running or scheduler.waiting
                or any(s.is_prefilling for s in running)):
            original(arrivals, cancels)
            return
        window.run(lambda: original(arrivals, cancels))

    engine._step = step
    engine.start()
    try:
        run_request(engine, GenerationRequest(request_id="warm", prompt_ids=prompt,
                                              max_tokens=16, ignore_eos=True))
        armed.set()
        run_request(engine, GenerationRequest(request_id="measured", prompt_ids=prompt,
                                              max_tokens=window.total_steps + 4,
                                              ignore_eos=True))
    finally:
        engine.stop()
    if not window.done:
        raise RuntimeError(f"the measured request ran {len(window.starts_s)} decode steps, "
                           f"the window needs {window.total_steps}")


def profile_runner(engine: Any, prompt: tuple[int, ...], window: StepWindow,
                   routing: Any) -> list[int]:
    """The runner on the engine's model: prefill, then one token per step under `window`
    (each step synchronised, as `two_lane_decode.run` times it); the buckets it captured."""
    from moe_core.decode_runner import DecodeRunner

    model = engine.served.model
    device = model.device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    ids = torch.tensor([prompt], device=device)  # [1, T]
    with routing, torch.no_grad():
        runner = DecodeRunner(model, 1, len(prompt) + window.total_steps + 2, use_graphs=cuda)
        token = runner.prefill(ids, torch.ones_like(ids)).argmax(dim=-1)  # [1]
        active = torch.ones(1, dtype=torch.bool, device=device)

        def step() -> None:
            nonlocal token
            _, token = runner.step(token, active)
            if cuda:
                torch.cuda.synchronize()

        for _ in range(window.total_steps):
            window.run(step)
        return sorted(runner._graphs)


def side_record(window: StepWindow, trace_path: Path | None) -> dict[str, Any]:
    """One side's tables from its window's trace (kept gzipped at `trace_path` if given)."""
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "trace.json"
        window.profiler.export_chrome_trace(str(file))
        raw = file.read_bytes()
    if trace_path is not None:
        trace_path.write_bytes(gzip.compress(raw))
    record = window_tables(json.loads(raw), MARGIN_STEPS, window.steps)
    record["wall_ms_per_step_unprofiled_median"] = window.unprofiled_ms()
    passes = window.last + 1 - window.first
    record["offload_per_pass"] = {
        name: (getattr(window.after, name) - getattr(window.before, name)) / passes
        for name in ("hits", "misses", "mapped_bytes", "bytes_copied", "cpu_experts")}
    uses = sum(record["offload_per_pass"][k] for k in ("hits", "misses", "cpu_experts"))
    record["offload_per_pass"]["hit_rate"] = record["offload_per_pass"]["hits"] / max(uses, 1e-9)
    record["trace"] = trace_path.name if trace_path is not None else None
    return record


def machine(device: str) -> dict[str, Any]:
    """Where it ran: GPU, CPU cores, host memory, torch."""
    host_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
            "cpu_cores": os.cpu_count(), "host_memory_bytes": host_bytes,
            "torch": torch.__version__}


def short(name: str, width: int = 96) -> str:
    """A kernel name cut to `width` characters for the terminal."""
    name = name.removeprefix("void ")
    return name if len(name) <= width else name[:width - 3] + "..."


def print_summary(record: dict[str, Any]) -> None:
    """The totals and top operations of each side, then the largest differences."""
    key = "device_ops" if record["engine"]["device_ops"] else "host_ops"
    print(f"\nbatch-1 decode step, {record['model']} x {record['num_layers']} layers, "
          f"{record['expert_dtype']} experts, {record['device']} ({key} by time per step)")
    for side in SIDES:
        r = record[side]
        o = r["offload_per_pass"]
        print(f"\n{side}: wall {r['wall_ms_per_step_median']:.3f} ms/step profiled "
              f"({r['wall_ms_per_step_unprofiled_median']:.3f} unprofiled), kernels "
              f"{r['kernel_ms_per_step']:.3f} ms ({r['kernels_per_step']:.0f}/step), copies "
              f"{r['memcpy_ms_per_step']:.3f} ms ({r['memcpys_per_step']:.0f}/step), device "
              f"busy {r['device_busy_ms_per_step']:.3f} ms, graph launches "
              f"{r['graph_launches_per_step']:.1f}/step; hit rate {o['hit_rate']:.1%}, "
              f"{o['mapped_bytes'] / 1e6:.1f} MB mapped/pass")
        print(f"{'us/step':>9} {'calls':>6}  name")
        for row in r[key][:TOP]:
            print(f"{row['us_per_step']:9.1f} {row['calls_per_step']:6.1f}  {short(row['name'])}")
    print("\nlargest differences (engine - runner)")
    print(f"{'diff us':>9} {'engine':>9} {'runner':>9} {'calls e/r':>11}  name")
    for row in record["diff"][:TOP]:
        calls = f"{row['engine_calls_per_step']:.0f}/{row['runner_calls_per_step']:.0f}"
        print(f"{row['diff_us_per_step']:9.1f} {row['engine_us_per_step']:9.1f} "
              f"{row['runner_us_per_step']:9.1f} {calls:>11}  {short(row['name'])}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     conflict_handler="resolve")
    add_serve_options(parser)
    parser.set_defaults(**S3_SERVE)
    parser.add_argument("--expert-dtype", choices=["bf16", "fp8"], default="fp8",
                        help="fp8: serve's --expert-dtype fp8; bf16: the model dtype")
    parser.add_argument("--out", type=Path, required=True, help="the JSON written")
    parser.add_argument("--steps", type=int, default=8, help="decode steps measured per side")
    parser.add_argument("--warmup", type=int, default=16,
                        help="decode steps of each side before the profiled ones")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--keep-traces", action="store_true",
                        help="keep each side's chrome trace gzipped next to the JSON")
    parser.add_argument("--commit", default=None, help="default: git rev-parse")
    parser.add_argument("--smoke", action="store_true",
                        help="check the script on the CPU with the embedded tiny model")
    args = parser.parse_args()
    if args.smoke:
        for name, value in SMOKE_SERVE.items():
            setattr(args, name, value)
        args.prompt_tokens = min(args.prompt_tokens, 16)
    if args.steps < 1 or args.warmup < 4 or args.prompt_tokens < 1:
        parser.error("--steps must be at least 1, --warmup 4, --prompt-tokens 1")
    return args


def describe(args: argparse.Namespace, engine: Any, settings: Any) -> dict[str, Any]:
    """The run's record before its results: when, where, what model and engine."""
    model = engine.served.model
    return {
        "script": "benchmarks/pass_kernels.py", "date": time.strftime("%Y-%m-%d"),
        "commit": args.commit or commit(), "command": " ".join(sys.argv),
        **machine(args.device), "device": args.device, "model": args.model,
        "num_layers": len(model.layers), "dtype": str(model.dtype),
        "expert_dtype": args.expert_dtype, "gpu_memory": args.gpu_memory,
        "kv_memory": args.kv_memory, "policy": args.policy, "fetch": args.fetch,
        "lanes": args.lanes, "routing": args.routing, "prompt_tokens": args.prompt_tokens,
        "steps": args.steps, "warmup_steps": args.warmup, "margin_steps": MARGIN_STEPS,
        "num_slots": engine.served.runtime.pool.num_slots,
        "num_experts": len(model.moe_blocks()) * model.spec.moe.num_experts,
        "engine_decode": engine.eager_decode_reason() or "captured",
        "engine_overlap": settings.overlap,
        "teardown_cupti": os.environ.get("TEARDOWN_CUPTI")}


def main() -> int:
    args = parse_args()
    from moe_infinity.serving.engine_setup import build_engine

    started = time.perf_counter()
    settings = engine_settings(argparse.Namespace(**{**vars(args), "expert_dtype": (
        "fp8" if args.expert_dtype == "fp8" else None)}))  # bf16: serve's default
    engine = build_engine(settings)
    print(f"engine built ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    activities = activities_for(args.device)  # after the load, which CUPTI would slow
    record = describe(args, engine, settings)
    traces = {side: args.out.with_name(f"{args.out.stem}.{side}.trace.json.gz")
              if args.keep_traces else None for side in SIDES}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    prompt = tuple(range(1, args.prompt_tokens + 1))

    window = StepWindow(engine.served.runtime, activities, args.warmup, args.steps)
    profile_engine(engine, prompt, window)
    record["engine"] = side_record(window, traces["engine"])
    print(f"engine profiled ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    window = StepWindow(engine.served.runtime, activities, args.warmup, args.steps)
    buckets = profile_runner(engine, prompt, window,
                             settings.experts.routing_context(engine.served.model))
    record["runner"] = side_record(window, traces["runner"])
    record["runner"]["captured_buckets"] = buckets

    key = "device_ops" if record["engine"]["device_ops"] else "host_ops"
    record["diff_of"] = key
    record["diff"] = diff_table(record["engine"][key], record["runner"][key], SIDES)
    if args.device.startswith("cuda"):
        record["peak_gpu_allocated_bytes"] = torch.cuda.max_memory_allocated()
    record["wall_s"] = time.perf_counter() - started
    args.out.write_text(json.dumps(record, indent=1), encoding="utf-8")
    print_summary(record)
    if args.device.startswith("cuda") and min(record[s]["kernels_per_step"] for s in SIDES) < 24:
        print("warning: fewer kernels per step than layers: the profiler may not have seen "
              "the graph replays' kernels", file=sys.stderr)
    print(f"\nwrote {args.out} ({record['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
