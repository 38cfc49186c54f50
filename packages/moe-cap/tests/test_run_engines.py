"""`moe-cap run` with in-process engines on the embedded tiny model: moe-gen (offline) and the
streaming engine behind `--engine moe-infinity`; GSM8K and multiple choice. (Perplexity against
moe-core's own evaluation is a cross-package test: tests/test_cap_perplexity.py.)"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from moe_cap.cli import app
from moe_cap.engine_options import EngineOptions
from moe_cap.gsm8k import answers_match, gsm8k_items, read_math_problems, score_gsm8k
from moe_cap.hardware import load_hardware_table
from moe_cap.load_pattern import LoadPattern
from moe_cap.run_benchmark import RunConfig, run_benchmark
from moe_cap.run_record import RunRecord
from moe_cap.run_view import view_run
from moe_cap.scoring_run import ScoringConfig, run_scoring
from moe_cap.target import GenerationSettings
from moe_cap.workload import WorkItem
from typer.testing import CliRunner

DATA = Path(__file__).parent / "data"
ITEMS = [WorkItem("story", prompt="Once upon a time, there was a little fox who", max_tokens=6),
         WorkItem("chat", messages=({"role": "user", "content": "Tom has 3 apples and buys 5 "
                                     "more. How many apples does he have now?"},))]


def _complete(record: RunRecord, rows: int) -> None:
    """Fields every engine run fills, consistent with each other."""
    assert record.serving is not None and record.serving.num_requests == rows
    assert record.serving.num_failed == 0
    assert record.steps and record.input_tokens > 0 and record.output_tokens > 0
    assert record.wall_seconds >= sum(s.seconds for s in record.steps)
    assert record.gpu == "none" and record.weight_dtype == "fp32"
    assert record.energy_source == "tdp"  # no NVML on a CPU machine


def test_moe_gen_in_process(tmp_path: Path) -> None:
    out = tmp_path / "g.json"
    outcome = run_benchmark(EngineOptions(engine="moe-gen", model="tiny-moe"), ITEMS,
                            RunConfig(record_path=out, settings=GenerationSettings(max_tokens=5),
                                      cpu="EPYC 9654", dram_gib=16.0))
    record = RunRecord.from_json(out)
    assert record == outcome.record
    _complete(record, 2)
    assert record.engine.startswith("moe-gen ") and record.serving is not None
    assert record.serving.target_kind == "offline"
    assert "ttft_s" not in record.serving.latencies and "e2e_s" in record.serving.latencies
    # moe-gen's own steps: every generated token came from one of them.
    assert record.output_tokens == sum(r.output_tokens for r in outcome.rows)
    assert record.output_tokens == sum(s.num_tokens for s in record.steps if s.phase == "decode") \
        + sum(1 for s in record.steps if s.phase == "prefill" for _ in s.chunks)
    assert all(r.output_tokens <= 6 for r in outcome.rows)
    view = view_run(record, load_hardware_table())
    assert view.cost is not None and view.utilisation is not None


def test_streaming_engine_in_process(tmp_path: Path) -> None:
    out = tmp_path / "i.json"
    outcome = run_benchmark(EngineOptions(engine="moe-infinity", model="tiny-moe"), ITEMS,
                            RunConfig(record_path=out, load=LoadPattern(concurrency=2),
                                      settings=GenerationSettings(max_tokens=5)))
    record = RunRecord.from_json(out)
    _complete(record, 2)
    assert record.serving is not None and record.serving.target_kind == "engine"
    assert {"ttft_s", "itl_s", "e2e_s"} <= set(record.serving.latencies)
    # One prefill step per request, then one decode step per further token.
    prefill = [s for s in record.steps if s.phase == "prefill"]
    decode = [s for s in record.steps if s.phase == "decode"]
    assert len(prefill) == 2 and len(decode) == record.output_tokens - 2
    for row in outcome.rows:
        assert row.ttft_s is not None and row.e2e_s is not None and row.ttft_s <= row.e2e_s
        assert len(row.itl_s) == row.output_tokens - 1


def test_gsm8k_on_20_problems(tmp_path: Path) -> None:
    problems = read_math_problems(DATA / "gsm8k_test_20.jsonl")
    items = gsm8k_items(problems, (), "chat", 48)

    def score(its, rows):  # type: ignore[no-untyped-def]
        return score_gsm8k(its, rows, shots=0, style="chat", data="fixture")

    outcome = run_benchmark(EngineOptions(engine="moe-infinity", model="tiny-moe"), items,
                            RunConfig(record_path=tmp_path / "g.json", scorer=score))
    accuracy = outcome.record.accuracy
    assert accuracy is not None and accuracy.num_examples == 20
    rows = {r.index: r for r in outcome.rows}
    correct = sum(answers_match(rows[i].text or "", p.final) for i, p in enumerate(problems))
    assert accuracy.score == correct / 20 and 0.0 <= accuracy.score <= 1.0
    assert RunRecord.from_json(tmp_path / "g.json").accuracy == accuracy


def test_multiple_choice(tmp_path: Path) -> None:
    record = run_scoring(EngineOptions(engine="moe-infinity", model="tiny-moe"),
                         ScoringConfig(task="choice", data=DATA / "choice.jsonl",
                                       record_path=tmp_path / "c.json"))
    accuracy = record.accuracy
    assert accuracy is not None and accuracy.num_examples == 4
    assert accuracy.score * 4 == accuracy.details["correct"]
    assert len(record.steps) == 4 * 3  # one forward pass per choice


def test_engine_not_installed_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    monkeypatch.setitem(sys.modules, "moe_gen", None)  # import moe_gen now fails
    result = CliRunner().invoke(app, ["run", "--engine", "moe-gen", "--input-len", "4",
                                      "--out", str(tmp_path / "r.json")])
    assert result.exit_code == 1
    assert result.stderr.strip() == ("error: --engine moe-gen needs the moe-gen package, which "
                                     "is not installed (install it beside moe-cap: pip install "
                                     "moe-gen)")


def test_requests_that_cannot_run_stop_the_run_first(tmp_path: Path) -> None:
    from moe_cap.errors import WorkloadError

    items = [*ITEMS, WorkItem("huge", prompt="Once", max_tokens=10**7),
             WorkItem("huge2", prompt="Twice", max_tokens=10**7)]
    with pytest.raises(WorkloadError, match=r"2 request\(s\) cannot run.*'huge'.*'huge2'"):
        run_benchmark(EngineOptions(engine="moe-infinity", model="tiny-moe"), items,
                      RunConfig(record_path=tmp_path / "r.json"))
    assert (tmp_path / "r.requests.jsonl").read_text() == ""  # nothing ran
    assert not (tmp_path / "r.json").exists()
