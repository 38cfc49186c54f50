"""`moe-cap report`: records of a load sweep against two stub servers and an engine record with
steps give a page with every figure and a row per run; records without sweeps or steps leave
the figures they cannot support out, saying why."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
from moe_cap import RunRecord, StepRecord, decode_batch, prefill_batch
from moe_cap.accuracy_result import AccuracyResult
from moe_cap.cli import app
from moe_cap.load_pattern import LoadPattern
from moe_cap.run_benchmark import RunConfig, ServerSpec, run_benchmark
from moe_cap.workload import WorkItem
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from stub_server import Script, StubServer

PNG = b"\x89PNG\r\n\x1a\n"


def _sweep(folder: Path, name: str, tpot_s: float, score: float) -> list[Path]:
    items = [WorkItem(f"r{i}", prompt="one two", max_tokens=6) for i in range(4)]
    paths = []
    with StubServer(Script(ttft_s=0.01, tpot_s=tpot_s)) as server:
        for concurrency in (1, 2):
            path = folder / f"{name}-c{concurrency}.json"
            run_benchmark(ServerSpec(server.url, name), items,
                          RunConfig(record_path=path, load=LoadPattern(concurrency=concurrency),
                                    gpu="H200"))
            record = RunRecord.from_json(path)
            replace(record, engine=name, accuracy=AccuracyResult(
                task="gsm8k", metric="exact_match", score=score, num_examples=20)).to_json(path)
            paths.append(path)
    return paths


def _engine_record(path: Path) -> Path:
    steps = [StepRecord("prefill", 0.2, prefill_batch(4, 512))]
    for batch in (1, 4, 16):
        steps += [StepRecord("decode", 0.01 + 0.001 * batch, decode_batch(batch, 600),
                             h2d_bytes=5 * 10**8)] * 5
    RunRecord(engine="moe-gen 0.1.0", model="qwen3-30b-a3b", num_layers=24, weight_dtype="bf16",
              kv_dtype="bf16", gpu="H200", wall_seconds=1.0, input_tokens=2048,
              output_tokens=105, steps=tuple(steps)).to_json(path)
    return path


def test_report_with_every_figure(tmp_path: Path) -> None:
    paths = [*_sweep(tmp_path, "ours", 0.002, 0.5), *_sweep(tmp_path, "peer", 0.02, 0.4),
             _engine_record(tmp_path / "gen.json")]
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["report", *map(str, paths), "--out", str(out)])
    assert result.exit_code == 0, result.output
    page = (out / "report.md").read_text()
    for figure in ("cap_radar.png", "throughput_latency.png", "utilisation_batch.png",
                   "measured_vs_bound.png"):
        assert (out / figure).read_bytes().startswith(PNG)
        assert f"]({figure})" in page
    rows = [line for line in page.splitlines() if line.startswith("| ours") or
            line.startswith("| peer") or line.startswith("| moe-gen")]
    assert len(rows) == 5
    assert "gsm8k 0.5" in page and "ours: cost" in page
    # The faster, more accurate system is the best on performance and accuracy.
    assert "ours: cost 1.00, accuracy 1.00, performance 1.00" in page


def test_report_says_what_it_left_out(tmp_path: Path) -> None:
    path = _sweep(tmp_path, "only", 0.002, 0.5)[0]
    out = tmp_path / "r"
    result = CliRunner().invoke(app, ["report", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "left out: throughput vs latency" in result.stderr
    assert not (out / "throughput_latency.png").exists()
    assert "no system has a load sweep" in (out / "report.md").read_text()


@pytest.mark.parametrize("bad", ["missing.json", "not-json.json"])
def test_bad_record_is_one_line(tmp_path: Path, bad: str) -> None:
    (tmp_path / "not-json.json").write_text("{")
    result = CliRunner().invoke(app, ["report", str(tmp_path / bad), "--out",
                                      str(tmp_path / "r")])
    assert result.exit_code == 1 and result.stderr.startswith("error: ")
    assert len(result.stderr.strip().splitlines()) == 1
