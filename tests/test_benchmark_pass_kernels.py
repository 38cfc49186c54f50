"""`benchmarks/pass_kernels.py` on the CPU: the trace tables it records (on a hand-made trace
shaped as CUPTI writes a GPU run's, since the CPU has no kernels to record) and the script
end to end on the embedded tiny model, so the one-shot GPU run cannot fail on a typo, a flag
or the JSON it writes."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from kernel_tables import STEP_MARK, diff_table, window_tables  # noqa: E402


def event(cat: str, name: str, ts: float, dur: float, tid: int = 1,
          correlation: int | None = None) -> dict[str, Any]:
    args = {} if correlation is None else {"correlation": correlation}
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 1, "tid": tid,
            "args": args}


def overlapped_trace() -> dict[str, Any]:
    """Four marked steps 100 us apart; each step launches the next pass's graph before it
    waits for its own, whose kernels run into the next step."""
    events = [event("user_annotation", STEP_MARK, 100.0 * i, 99.0) for i in range(5)]
    for i, launch in enumerate((50.0, 150.0, 250.0, 350.0)):
        correlation = 10 + i
        events += [event("cpu_op", "aten::copy_", launch - 10, 30.0),
                   event("cuda_runtime", "cudaGraphLaunch", launch, 10.0,
                         correlation=correlation),
                   event("kernel", "attention", launch + 60, 20.0, tid=7,
                         correlation=correlation),
                   event("kernel", "experts", launch + 80, 40.0, tid=7,
                         correlation=correlation)]
    events += [event("gpu_memcpy", "Memcpy DtoH (Device -> Pinned)", 280.0, 2.0, tid=7),
               {"ph": "M", "name": "thread_name", "pid": 1, "tid": 1}]
    return {"traceEvents": events}


def test_window_counts_what_its_steps_launched() -> None:
    """Steps 1 and 2 (100-300 us) launched the passes at 150 and 250 us: both counted whole,
    though the second's kernels run after the window; the pass launched at 50 us, whose
    kernels run in step 1, is not. The copy without a launch is placed by its start."""
    record = window_tables(overlapped_trace(), first=1, num_steps=2)
    assert record["steps"] == 2
    assert record["wall_ms_each_step"] == [0.1, 0.1]
    assert record["kernels_per_step"] == 2.0
    assert record["kernel_ms_per_step"] == pytest.approx(0.060)
    assert record["memcpys_per_step"] == 0.5
    assert record["device_ops_placed_by_start"] == 1
    assert record["graph_launches_per_step"] == 1.0
    assert record["device_busy_ms_per_step"] == pytest.approx((60 + 60 + 2) / 2 / 1e3)
    names = [(r["name"], r["calls_per_step"], r["us_per_step"]) for r in record["device_ops"]]
    assert names == [("experts", 1.0, 40.0), ("attention", 1.0, 20.0),
                     ("Memcpy DtoH (Device -> Pinned)", 0.5, 1.0)]
    host = {r["name"]: r for r in record["host_ops"]}
    assert host["aten::copy_"]["us_per_step"] == 20.0  # 30 less the nested launch's 10
    assert host["cudaGraphLaunch"]["calls_per_step"] == 1.0


def test_window_needs_the_step_after_it() -> None:
    with pytest.raises(ValueError, match="marks 5 steps"):
        window_tables(overlapped_trace(), first=2, num_steps=3)


def test_diff_puts_the_largest_difference_first() -> None:
    a = [{"name": "k", "category": "kernel", "calls_per_step": 2.0, "us_per_step": 10.0},
         {"name": "only_a", "category": "kernel", "calls_per_step": 1.0, "us_per_step": 3.0}]
    b = [{"name": "k", "category": "kernel", "calls_per_step": 1.0, "us_per_step": 30.0}]
    rows = diff_table(a, b, ("engine", "runner"))
    assert [(r["name"], r["diff_us_per_step"]) for r in rows] == [("k", -20.0), ("only_a", 3.0)]
    assert rows[1]["runner_calls_per_step"] == 0.0 and rows[0]["engine_calls_per_step"] == 2.0


@pytest.mark.slow
def test_smoke_run_writes_both_sides_tables_and_traces(tmp_path: Path) -> None:
    out = tmp_path / "pk.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "benchmarks/pass_kernels.py", "--smoke", "--out",
                           str(out), "--steps", "2", "--warmup", "4", "--keep-traces"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["device"] == "cpu" and record["expert_dtype"] == "fp8"
    assert record["routing"] == "uniform" and record["fetch"] == "mapped"
    assert 0 < record["num_slots"] < record["num_experts"]  # misses take the mapped path
    for side in ("engine", "runner"):
        r = record[side]
        assert r["steps"] == 2 and len(r["wall_ms_each_step"]) == 2
        assert r["wall_ms_per_step_median"] > 0 and r["wall_ms_per_step_unprofiled_median"] > 0
        assert r["device_ops"] == [] and r["kernels_per_step"] == 0  # the CPU: no kernels
        assert {"name", "category", "calls_per_step", "us_per_step"} <= set(r["host_ops"][0])
        top = [row["us_per_step"] for row in r["host_ops"]]
        assert top == sorted(top, reverse=True) and top[0] > 0
        offload = r["offload_per_pass"]
        assert offload["hits"] + offload["misses"] > 0 and 0 < offload["hit_rate"] < 1
        assert json.loads(gzip.decompress((tmp_path / r["trace"]).read_bytes()))["traceEvents"]
    assert record["diff_of"] == "host_ops" and record["diff"]
    assert "largest differences" in done.stdout
