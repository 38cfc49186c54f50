"""Where batch-1 decode time goes with the copy fetch path: cProfile of resident vs all-cached
steps, and a per-layer timeline of the nothing-cached path (CUDA events on every copy and on
the compute stream at each executor call, host clocks at its phases). The diagnosis behind
decision 0004.

    PYTHONPATH=packages/moe-core/src python3 benchmarks/decode_timeline.py \
        --out $OUT/decode_timeline.json

`--num-layers N` sets the decoder layers kept (default 12).
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import itertools
import json
import os
import pstats
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

Step = Callable[[torch.Tensor], torch.Tensor]


def rss_gb() -> dict[str, float]:
    """This process's resident set now (`VmRSS`) and at its peak (`VmHWM`), in GiB."""
    d = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                k, v = line.split(":")
                d[k] = int(v.split()[0]) / 2**20
    return d


def cprofile_steps(step: Step, token: torch.Tensor, n: int = 5, rows: int = 30) -> str:
    """cProfile table (top `rows` by own time) of `n` decode steps from `token`."""
    pr = cProfile.Profile()
    torch.cuda.synchronize()
    pr.enable()
    for _ in range(n):
        token = step(token)
    torch.cuda.synchronize()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(rows)
    return s.getvalue()


def save(path: Path, record: dict[str, Any]) -> None:
    """Write `record` as JSON to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)


def resident_and_cached(model: Any, prompt: torch.Tensor, record: dict[str, Any]) -> Any:
    """Resident steps, then every expert offloaded and all cached in GPU slots (with GC on and
    off); returns the host store."""
    from moe_core import GpuSlotPool, HostExpertStore, install_offloading, make_copy_engine
    from offload_decode import decode_times, ours_decoder, summarise

    step, first = ours_decoder(model, prompt)
    record["resident"] = summarise(decode_times(step, first, 16))
    print("resident", record["resident"], flush=True)
    record["resident_cprofile"] = cprofile_steps(step, first)
    t0 = time.perf_counter()
    store = HostExpertStore.from_model(model)
    record["store_build_s"] = time.perf_counter() - t0
    record["store_pinned"] = store.is_pinned
    record["store_bytes"] = store.nbytes
    record["rss_after_store_gb"] = rss_gb()
    print("store", record["store_build_s"], store.is_pinned, rss_gb(), flush=True)
    pool = GpuSlotPool(store.layout, len(store.experts()), "cuda")
    engine = make_copy_engine("cuda")
    runtime = install_offloading(model, store, pool, engine, drop_local_experts=True)
    gc.collect()
    torch.cuda.empty_cache()
    runtime.prefetch(store.experts())
    runtime.drain()
    step, first = ours_decoder(model, prompt)
    record["all_cached"] = summarise(decode_times(step, first, 16))
    print("all_cached", record["all_cached"], flush=True)
    record["all_cached_cprofile"] = cprofile_steps(step, first)
    gc.disable()
    record["all_cached_nogc"] = summarise(decode_times(step, first, 16))
    gc.enable()
    print("all_cached nogc", record["all_cached_nogc"], flush=True)
    return store


def record_tickets(engine: Any) -> list[Any]:
    """Wrap `engine.submit` so every ticket it returns is appended to the returned list."""
    tickets: list[Any] = []
    submit = engine.submit

    def recording_submit(*args: Any, **kwargs: Any) -> Any:
        ticket = submit(*args, **kwargs)
        tickets.append(ticket)
        return ticket

    engine.submit = recording_submit
    return tickets


def compute_event(cupy: Any) -> Any:
    """A CuPy event recorded on torch's current stream."""
    event = cupy.cuda.Event()
    cupy.cuda.runtime.eventRecord(event.ptr, torch.cuda.current_stream().cuda_stream)
    return event


@contextmanager
def executor_marks(cupy: Any, tickets: list[Any]) -> Iterator[list[dict[str, Any]]]:
    """Patch `OffloadedExecutor._gathered` to log one dict per call: events on the compute
    stream at entry and exit (`e0`, `e1`), host clocks at entry, before and after the cache's
    `acquire` and at exit (`h0`, `h_sync`, `h_sub`, `h1`), and the range of `tickets` it
    submitted (`t0`, `t1`). Yields the list; the original method is back on exit."""
    from moe_core.offload.offloaded_executor import OffloadedExecutor

    marks: list[dict[str, Any]] = []
    orig = OffloadedExecutor._gathered

    def gathered(self: Any, hidden: torch.Tensor, ids: torch.Tensor,
                 w: torch.Tensor) -> torch.Tensor | None:
        m = {"h0": time.perf_counter(), "e0": compute_event(cupy), "t0": len(tickets)}
        c = self.cache
        orig_acq = c.acquire

        def acq(x: Any) -> Any:
            m["h_sync"] = time.perf_counter()
            r = orig_acq(x)
            m["h_sub"] = time.perf_counter()
            return r

        c.acquire = acq
        try:
            out = orig(self, hidden, ids, w)
        finally:
            del c.acquire
        m["e1"] = compute_event(cupy)
        m["h1"] = time.perf_counter()
        m["t1"] = len(tickets)
        marks.append(m)
        return out

    OffloadedExecutor._gathered = gathered
    try:
        yield marks
    finally:
        OffloadedExecutor._gathered = orig


def timeline_rows(cupy: Any, marks: list[dict[str, Any]], tickets: list[Any], ref: Any,
                  href: float) -> list[dict[str, Any]]:
    """One row per executor call: GPU times (ms from event `ref`) of entry, first copy start,
    last copy end and exit; host times (ms from `href`) of its phases; copies it submitted."""

    def el(e: Any) -> float:
        return cupy.cuda.get_elapsed_time(ref, e)

    rows = []
    prev_copy_end = None
    for m in marks:
        ts = tickets[m["t0"] : m["t1"]]
        cs = min(el(t.handle.start) for t in ts if t.handle.start is not None) if ts else None
        ce = max(el(t.handle.end) for t in ts) if ts else None
        r = {"gpu_entry": el(m["e0"]), "copy_start": cs, "copy_end": ce, "gpu_exit": el(m["e1"]),
             "h_entry": (m["h0"] - href) * 1e3, "h_sync": (m["h_sync"] - href) * 1e3,
             "h_sub": (m["h_sub"] - href) * 1e3, "h_exit": (m["h1"] - href) * 1e3,
             "ncopies": len(ts), "prev_copy_end": prev_copy_end}
        prev_copy_end = ce
        rows.append(r)
    return rows


def timeline_summary(rows: list[dict[str, Any]], step_ms: float) -> dict[str, float | None]:
    """Medians (ms) of each phase over the rows after the first that follow a copy."""

    def med(f: Callable[[dict[str, Any]], float]) -> float | None:
        v = [f(r) for r in rows[1:] if r["prev_copy_end"] is not None
             and r["copy_start"] is not None]
        return statistics.median(v) if v else None

    return {
        "step_ms": step_ms,
        "copy_span": med(lambda r: r["copy_end"] - r["copy_start"]),
        "gpu_tail_prevcopyend_to_entry": med(lambda r: r["gpu_entry"] - r["prev_copy_end"]),
        "entry_to_copy_start_gpu": med(lambda r: r["copy_start"] - r["gpu_entry"]),
        "host_entry_to_sync_done": med(lambda r: r["h_sync"] - r["h_entry"]),
        "host_sync_to_submitted": med(lambda r: r["h_sub"] - r["h_sync"]),
        "host_submitted_to_exit": med(lambda r: r["h_exit"] - r["h_sub"]),
        "host_exit_to_next_entry": statistics.median(
            [b["h_entry"] - a["h_exit"] for a, b in itertools.pairwise(rows)]),
        "copy_end_to_gpu_exit": med(lambda r: r["gpu_exit"] - r["copy_end"]),
        "ncopies": med(lambda r: r["ncopies"]),
    }


def nothing_cached(model: Any, prompt: torch.Tensor, store: Any,
                   record: dict[str, Any]) -> None:
    """Nothing cached (top_k slots): decode times, a timeline of 4 steps, and a cProfile."""
    import cupy
    from moe_core import GpuSlotPool, install_offloading, make_copy_engine
    from offload_decode import decode_times, ours_decoder, summarise

    top_k = model.spec.moe.router.top_k
    pool = GpuSlotPool(store.layout, top_k, "cuda")
    engine = make_copy_engine("cuda")
    install_offloading(model, store, pool, engine)  # the model's executors hold the cache
    tickets = record_tickets(engine)  # stays on for the cProfile below, as in the diagnosis
    with executor_marks(cupy, tickets) as marks:
        step, first = ours_decoder(model, prompt)
        record["nothing_cached"] = summarise(decode_times(step, first, 8))
        print("nothing_cached", record["nothing_cached"], flush=True)
        marks.clear()
        tickets.clear()
        torch.cuda.synchronize()
        ref = compute_event(cupy)
        href = time.perf_counter()
        tok = first
        for _ in range(4):
            tok = step(tok)
        torch.cuda.synchronize()
        hend = time.perf_counter()
        end = compute_event(cupy)
        end.synchronize()
        rows = timeline_rows(cupy, marks, tickets, ref, href)
        record["timeline_summary_ms"] = timeline_summary(rows, (hend - href) * 1e3 / 4)
        record["timeline_rows"] = rows[:30]
        print(json.dumps(record["timeline_summary_ms"], indent=1), flush=True)
    record["nothing_cached_cprofile"] = cprofile_steps(step, first, n=3)


def main() -> None:
    """Parse arguments, run every phase, write JSON after each, print the cProfile tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-layers", type=int, default=12, help="decoder layers kept")
    parser.add_argument("--out", type=Path,
                        default=Path(os.environ.get("OUT", ".")) / "decode_timeline.json",
                        help="write the JSON record here (default: $OUT/decode_timeline.json, "
                             "or ./decode_timeline.json without OUT)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("decode_timeline: needs a CUDA GPU")
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # offload_decode's helpers
    from moe_core import load_model

    record: dict[str, Any] = {"num_layers": args.num_layers}
    model = load_model("qwen3-30b-a3b", "cuda", torch.bfloat16, dummy=True, seed=0,
                       num_layers=args.num_layers)
    prompt = torch.randint(0, model.spec.vocab_size, (1, 32), device="cuda")
    store = resident_and_cached(model, prompt, record)
    save(args.out, record)
    gc.collect()  # the all-cached runtime and its slots went with resident_and_cached's frame
    torch.cuda.empty_cache()
    nothing_cached(model, prompt, store, record)
    save(args.out, record)
    print(record["resident_cprofile"][:6000])
    print(record["all_cached_cprofile"][:6000])
    print(record["nothing_cached_cprofile"][:5000])


if __name__ == "__main__":
    main()
