"""`moe-cap run` on the command line: a stub server end to end, `--json`, one-line errors for
bad input, and Ctrl-C keeping what was measured (exit 130, a partial record)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from moe_cap.cli import app
from moe_cap.run_record import RunRecord
from typer.testing import CliRunner, Result

sys.path.insert(0, str(Path(__file__).parent))
from stub_server import Script, StubServer

DATA = Path(__file__).parent / "data"


def run(*args: str) -> Result:
    return CliRunner().invoke(app, ["run", *args])


def assert_one_line_error(result: Result, message: str) -> None:
    assert result.exit_code == 1, result.output
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.output + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stdout == ""


def test_synthetic_run_prints_json(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    with StubServer(Script(ttft_s=0.02, tpot_s=0.005)) as server:
        result = run("--url", server.url, "--model", "stub", "--input-len", "uniform:4:8",
                     "--output-len", "6", "--num-prompts", "5", "--concurrency", "2",
                     "--slo-ttft", "1", "--out", str(out), "--json")
        assert all(r["ignore_eos"] is True and r["max_tokens"] == 6 for r in server.requests)
    assert result.exit_code == 0, result.output
    printed = RunRecord.from_dict(json.loads(result.stdout))
    assert printed == RunRecord.from_json(out)
    assert printed.serving is not None and printed.serving.num_requests == 5
    assert printed.output_tokens == 30
    # A server's record has no steps: utilisation says so in one line.
    assert_one_line_error(CliRunner().invoke(app, ["utilisation", str(out)]),
                          "the record has no engine steps")


def test_label_names_the_server_in_the_record_and_the_report(tmp_path: Path) -> None:
    """Two servers of one model (ours and a peer such as llama-server) are two systems of the
    report by the names given, not by their URLs."""
    records = []
    for name in ("llama.cpp 0c1e5709", "moe-infinity serve"):
        out = tmp_path / f"{name.split()[0]}.json"
        with StubServer(Script(ttft_s=0.01, tpot_s=0.002)) as server:
            result = run("--url", server.url, "--model", "qwen3-30b-a3b", "--label", name,
                         "--input-len", "4", "--output-len", "3", "--num-prompts", "2",
                         "--out", str(out), "--json")
        assert result.exit_code == 0, result.output
        assert RunRecord.from_json(out).engine == name
        records.append(str(out))
    report = CliRunner().invoke(app, ["report", *records, "--out", str(tmp_path / "report")])
    assert report.exit_code == 0, report.output
    page = (tmp_path / "report" / "report.md").read_text()
    assert "| llama.cpp 0c1e5709 |" in page and "| moe-infinity serve |" in page


def test_gsm8k_through_a_server(tmp_path: Path) -> None:
    out = tmp_path / "g.json"
    with StubServer(Script(ttft_s=0.01, tpot_s=0.001)) as server:
        result = run("--url", server.url, "--model", "stub", "--task", "gsm8k", "--data",
                     str(DATA / "gsm8k_test_20.jsonl"), "--limit", "3", "--shots", "2",
                     "--shots-data", str(DATA / "gsm8k_train_5.jsonl"), "--prompt-style",
                     "completion", "--max-tokens", "5", "--out", str(out), "--json")
        prompts = [str(r["prompt"]) for r in server.requests]
    assert result.exit_code == 0, result.output
    assert len(prompts) == 3 and all(p.count("Question:") == 3 for p in prompts)
    assert all(p.endswith("Answer:") and "<<" not in p for p in prompts)
    accuracy = RunRecord.from_json(out).accuracy
    # The stub answers " t0 t1 t2 t3 t4": no number, so nothing matches.
    assert accuracy is not None and accuracy.num_examples == 3 and accuracy.score == 0.0
    assert accuracy.details["shots"] == 2 and accuracy.details["prompt_style"] == "completion"


def test_table_output(tmp_path: Path) -> None:
    workload = tmp_path / "w.jsonl"
    workload.write_text('{"prompt": "a b"}\n{"messages": [{"role": "user", "content": "c"}]}\n')
    with StubServer(Script(ttft_s=0.02, tpot_s=0.005)) as server:
        result = run("--url", server.url, "--model", "stub", "--workload", str(workload),
                     "--max-tokens", "4", "--out", str(tmp_path / "r.json"))
    assert result.exit_code == 0, result.output
    for word in ("TTFT", "TPOT", "ITL", "e2e", "output tok/s"):
        assert word in result.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--url", "http://127.0.0.1:9/v1", "--model", "x", "--input-len", "4"],
     "cannot reach http://127.0.0.1:9/v1"),
    (["--url", "ftp://x/v1", "--model", "x", "--input-len", "4"], "--url must start with http"),
    (["--url", "http://127.0.0.1:9/v1", "--input-len", "4"], "--url needs --model"),
    (["--input-len", "4"], "give a target"),
    (["--engine", "moe-foo", "--input-len", "4"], "--engine must be one of"),
    (["--url", "http://127.0.0.1:9/v1", "--model", "x"], "give one workload"),
    (["--url", "http://127.0.0.1:9/v1", "--model", "x", "--input-len", "4", "--slo-ttft", "-1"],
     "--slo-ttft must be a positive number"),
    (["--url", "http://127.0.0.1:9/v1", "--model", "x", "--input-len", "4", "--slo-tpot", "0"],
     "--slo-tpot must be a positive number"),
    (["--url", "http://127.0.0.1:9/v1", "--model", "x", "--input-len", "uniform:9:1"],
     "--input-len"),
    (["--url", "http://127.0.0.1:9/v1", "--model", "x", "--input-len", "4", "--rate", "0"],
     "--rate must be > 0"),
    (["--url", "http://127.0.0.1:9/v1", "--model", "x", "--task", "gsm8k"], "needs --data"),
    (["--url", "http://127.0.0.1:9/v1", "--model", "x", "--task", "mmlu"], "--task must be"),
    (["--engine", "moe-gen", "--task", "gsm8k", "--data", str(DATA / "gsm8k_test_20.jsonl"),
      "--shots", "2"], "--shots needs --shots-data"),
    (["--engine", "moe-gen", "--input-len", "4", "--rate", "2"], "moe-gen is an offline engine"),
    (["--engine", "moe-gen", "--input-len", "4", "--label", "x"], "--label names a server"),
    (["--url", "http://127.0.0.1:9/v1", "--model", "x", "--input-len", "4", "--label", " "],
     "--label names a server"),
])
def test_bad_input_is_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    assert_one_line_error(run(*args, "--out", str(tmp_path / "r.json")), message)


def test_bad_workload_line_is_named(tmp_path: Path) -> None:
    workload = tmp_path / "w.jsonl"
    workload.write_text('{"prompt": "fine"}\n{"prompt": "x", "max_tokens": "many"}\n')
    result = run("--url", "http://127.0.0.1:9/v1", "--model", "x", "--workload", str(workload),
                 "--out", str(tmp_path / "r.json"))
    assert_one_line_error(result, "line 2: max_tokens must be an integer")


def test_bad_slo_value_does_not_parse() -> None:
    result = run("--url", "http://127.0.0.1:9/v1", "--model", "x", "--input-len", "4",
                 "--slo-ttft", "fast")
    assert result.exit_code == 2 and "--slo-ttft" in result.stderr
    assert "Traceback" not in result.stderr


def test_ctrl_c_keeps_what_was_measured(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    with StubServer(Script(ttft_s=0.05, tpot_s=0.05)) as server:
        process = subprocess.Popen(
            [str(Path(sys.executable).with_name("moe-cap")), "run", "--url", server.url,
             "--model", "stub",
             "--input-len", "4", "--output-len", "4", "--num-prompts", "1000",
             "--concurrency", "2", "--out", str(out)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        rows = out.with_name("r.requests.jsonl")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not rows.exists()
                                               or len(rows.read_text().splitlines()) < 4):
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    record = RunRecord.from_json(out)
    assert record.serving is not None and record.serving.interrupted
    done = len(rows.read_text().splitlines())
    assert 4 <= record.serving.num_requests == done < 1000
