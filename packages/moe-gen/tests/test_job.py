"""Jobs on the embedded model (CPU): outputs written as requests finish, resume after an
interruption loses and duplicates nothing, a torn last line is redone, the run record is one
moe-cap reads, and the CLI turns user mistakes into one line and exit status 1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from moe_core import TINY_MODEL_NAME, OutputError
from moe_gen import Defaults, InputError
from moe_gen.cli import app
from moe_gen.job import JobConfig, run_job, sample_input
from typer.testing import CliRunner

RunRecord = pytest.importorskip("moe_cap").RunRecord  # the reader of our run records

NEW = 6


class Interrupt(Exception):
    pass


def config(tmp_path: Path, output: str = "out.jsonl") -> JobConfig:
    return JobConfig(model=TINY_MODEL_NAME, input=sample_input(), output=tmp_path / output,
                     defaults=Defaults(max_new_tokens=NEW), gpu_memory_bytes=1 << 30)


def lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, object]], dict]:
    tmp = tmp_path_factory.mktemp("full")
    outcome = run_job(config(tmp))
    return lines(tmp / "out.jsonl"), outcome.record  # type: ignore[return-value]


def test_every_request_is_written_once(full_run: tuple) -> None:
    out, _ = full_run
    ids = [json.loads(line)["id"] for line in sample_input().read_text().splitlines()]
    assert sorted(r["id"] for r in out) == sorted(ids)
    for r in out:
        assert r["finish_reason"] in ("eos", "length", "stop")
        assert isinstance(r["text"], str) and r["prompt_tokens"] > 0
        assert r["completion_tokens"] <= (24 if r["id"] == "fr-1" else NEW)


def test_run_record_is_read_by_moe_cap(full_run: tuple) -> None:
    _, record = full_run
    parsed = RunRecord.from_dict(record)
    assert parsed.output_tokens == sum(r["completion_tokens"] for r in full_run[0])
    assert parsed.engine.startswith("moe-gen")


def test_resume_after_interruption_loses_and_duplicates_nothing(tmp_path: Path,
                                                                full_run: tuple) -> None:
    seen = []

    def stop_after_three(result: object) -> None:
        seen.append(result)
        if len(seen) == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        run_job(config(tmp_path), on_result=stop_after_three)
    assert len(lines(tmp_path / "out.jsonl")) == 3
    with (tmp_path / "out.jsonl").open("a") as f:
        f.write('{"id": "torn')  # a crash mid-line: that request is redone
    outcome = run_job(config(tmp_path))
    assert outcome.skipped == 3
    resumed = lines(tmp_path / "out.jsonl")
    assert sorted(map(json.dumps, resumed)) == sorted(map(json.dumps, full_run[0]))


def test_cli_run_and_plan(tmp_path: Path) -> None:
    runner = CliRunner()
    out, record = tmp_path / "o.jsonl", tmp_path / "rr.json"
    result = runner.invoke(app, ["run", "--output", str(out), "--max-new-tokens", "3",
                                 "--json", str(record), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "requests done" in result.output and "decode" in result.output
    assert RunRecord.from_json(record).engine.startswith("moe-gen")
    result = runner.invoke(app, ["plan", "--device", "cpu", "--gpu-memory", "1GiB"])
    assert result.exit_code == 0, result.output
    assert "predicted decode step" in result.output and "bound" in result.output
    result = runner.invoke(app, ["plan", "mixtral-8x7b", "--device", "cpu", "--json",
                                 "--num-layers", "8"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["plan"]["offload"] is True


@pytest.mark.parametrize(("args", "message"), [
    (["run", "--input", "MISSING"], "no such input file"),
    (["run", "--gpu-memory", "lots"], "error:"),
    (["plan", "no-such-model"], "no such model folder"),
    (["plan", "mixtral-8x7b", "--gpu-memory", "1GiB", "--host-memory", "1TiB", "--device",
      "cpu"], "nothing fits"),
    (["plan", "mixtral-8x7b", "--host-memory", "64GiB", "--device", "cpu"],
     "raise --host-memory"),
])
def test_cli_user_errors_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output


def test_cli_reports_bad_input_lines(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n')
    result = CliRunner().invoke(app, ["run", "--input", str(bad), "--output",
                                      str(tmp_path / "o.jsonl")])
    assert result.exit_code == 1
    assert "line 2: duplicate id 'a'" in result.output


def test_requests_are_checked_before_the_model_loads(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Every request that cannot run is reported, by line, and nothing is loaded or written."""
    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("moe_gen.job.load_for_generation", no_load)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "ok", "prompt": "fine"}\n'
                   '{"id": "t", "prompt": "x", "temperature": -1}\n'
                   '{"id": "e", "prompt": ""}\n'
                   + json.dumps({"id": "long", "prompt": "word " * 1100}) + "\n")
    job = JobConfig(model=TINY_MODEL_NAME, input=bad, output=tmp_path / "out.jsonl",
                    defaults=Defaults(max_new_tokens=NEW))
    with pytest.raises(InputError, match="2 bad line") as info:
        run_job(job)
    assert "line 2: request 't': temperature must be >= 0" in str(info.value)
    assert "line 3: request 'e': the prompt is empty" in str(info.value)
    bad.write_text('{"id": "ok", "prompt": "fine"}\n'
                   + json.dumps({"id": "long", "prompt": "word " * 1100}) + "\n")
    with pytest.raises(InputError, match=r"line 2: the prompt is \d+ tokens.*context of 1024"):
        run_job(job)
    assert not (tmp_path / "out.jsonl").exists()


def test_a_rerun_of_a_finished_job_still_has_its_run_record(tmp_path: Path,
                                                            full_run: tuple) -> None:
    first = run_job(config(tmp_path))
    again = run_job(config(tmp_path))
    assert again.skipped == len(full_run[0]) and again.summary.requests == 0
    assert again.record == first.record
    assert RunRecord.from_dict(again.record).output_tokens == sum(
        r["completion_tokens"] for r in full_run[0])


def test_a_run_record_moe_gen_did_not_write_is_never_overwritten(tmp_path: Path) -> None:
    foreign = tmp_path / "out.jsonl.run-record.json"
    foreign.write_text('{"mine": true}\n')
    with pytest.raises(OutputError, match="not a moe-gen run record"):
        run_job(config(tmp_path))
    assert foreign.read_text() == '{"mine": true}\n'
