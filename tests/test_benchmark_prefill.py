"""`benchmarks/prefill_latency.py` end to end on the embedded tiny model (`--smoke`), so that the
one-shot GPU run of decision 0018 cannot fail on a typo, a flag or the JSON it writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "benchmarks/prefill_latency.py", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout, check=False)


def test_admit_and_two_ring_sizes_are_measured_and_recorded(tmp_path: Path) -> None:
    out = tmp_path / "prefill.json"
    done = run_script("--smoke", "--out", str(out), "--ring-slots", "2,8", "--runs", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    modes = record["modes"]
    assert [(m["prefill"], m["ring_slots"]) for m in modes] == [("admit", 0), ("stream", 2),
                                                                 ("stream", 8)]
    admit, *streams = modes
    assert admit["expert_path"] == ["copy"] and admit["evictions_per_prefill"] > 0
    assert admit["streamed_bytes_per_prefill"] == 0
    for entry in streams:
        assert entry["expert_path"] == ["stream"] and entry["evictions_per_prefill"] == 0
        assert entry["cache_slots"] == admit["cache_slots"] - entry["ring_slots"]
        assert entry["streamed_bytes_per_prefill"] == entry["bytes_copied_per_prefill"] > 0
        assert entry["streamed_bytes_per_prefill"] == (entry["misses_per_prefill"]
                                                       * record["expert_bytes"])
    for entry in modes:
        assert entry["runs"] == 2 and len(entry["times_ms"]) == 2 and entry["median_ms"] > 0
        assert 0 < entry["hit_rate"] < 1 and entry["link_bound_ms"] > 0
    assert "prefill stream ring  8" in done.stdout
    assert not list(tmp_path.glob("*.tmp"))


def test_an_unknown_mode_is_refused_in_one_line(tmp_path: Path) -> None:
    done = run_script("--smoke", "--out", str(tmp_path / "x.json"), "--modes", "admit,evict")
    assert done.returncode == 2 and "--modes: unknown ['evict']" in done.stderr
