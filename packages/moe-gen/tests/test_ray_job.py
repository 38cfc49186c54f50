"""moe-gen on Ray (issues 18 and 19): a local Ray cluster on the CPU runs the embedded model's job
with two engine actors, and the output equals the single-process run's, id for id; a rerun
skips the ids already done; the Ray Data API completes a dataset of requests the same way.

One local cluster serves the module (starting one costs ~10-25 s on a 2-core machine); the tests
that need it are skipped, saying why, only where Ray is not installed (CI installs the extra).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from moe_core import TINY_MODEL_NAME, SettingError
from moe_gen import (
    Defaults,
    GenRequest,
    InputError,
    JobConfig,
    RayConfig,
    generate_dataset,
    read_requests,
    run_job,
)
from moe_gen.batch_loop import StepStats
from moe_gen.cli import app
from moe_gen.job import sample_input
from moe_gen.ray_data import _num_engines, _requests, request_row
from moe_gen.requests import request_from_dict
from typer.testing import CliRunner

RunRecord = pytest.importorskip("moe_cap").RunRecord

NEW = 6
DONE = 3  # results already in the output when the Ray job starts


def lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    """A local Ray cluster for the module's jobs (the job's own way of starting one)."""
    if importlib.util.find_spec("ray") is None:
        pytest.skip("ray is not installed (the moe-gen[ray] extra)")
    from moe_gen.ray_job import ray_cluster

    with ray_cluster(None):
        yield


@pytest.fixture(scope="module")
def single_process(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, object]]:
    """The job on the embedded model, in this process."""
    out = tmp_path_factory.mktemp("one") / "out.jsonl"
    run_job(JobConfig(model=TINY_MODEL_NAME, output=out, defaults=Defaults(max_new_tokens=NEW),
                      gpu_memory_bytes=1 << 30))
    return lines(out)


@pytest.mark.slow
def test_two_engines_write_the_single_process_output_and_skip_done_ids(
        tmp_path: Path, cluster: None, single_process: list[dict[str, object]]) -> None:
    out, report, record = tmp_path / "out.jsonl", tmp_path / "report.json", tmp_path / "rr.json"
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n"
                           for r in single_process[:DONE]))
    result = CliRunner().invoke(app, [
        "run", "--ray-engines", "2", "--device", "cpu", "--max-new-tokens", str(NEW),
        "--gpu-memory", "1GiB", "--output", str(out), "--report", str(report),
        "--json", str(record)])
    assert result.exit_code == 0, result.output
    assert "on 2 engines (Ray)" in result.output
    written = lines(out)
    assert [r["id"] for r in written[:DONE]] == [r["id"] for r in single_process[:DONE]]
    assert len(written) == len(single_process)  # the done ids were skipped, none repeated
    assert {r["id"]: r for r in written} == {r["id"]: r for r in single_process}
    summary = json.loads(report.read_text())
    assert summary["skipped"] == DONE and summary["num_engines"] == 2
    parsed = RunRecord.from_json(record)
    assert parsed.output_tokens == sum(r["completion_tokens"] for r in written[DONE:])
    assert parsed.gpu == "none"


@pytest.mark.slow
def test_the_ray_data_api_completes_a_dataset_of_requests(
        cluster: None, single_process: list[dict[str, object]]) -> None:
    import ray.data

    requests = read_requests(sample_input())
    dataset = ray.data.from_items([request_row(i, r) for i, r in enumerate(requests)])
    config = JobConfig(model=TINY_MODEL_NAME, defaults=Defaults(max_new_tokens=NEW),
                       gpu_memory_bytes=1 << 30, ray=RayConfig(num_engines=1))
    rows = generate_dataset(dataset, config, prompt_tokens=32, num_requests=8).take_all()
    expected = {r["id"]: r for r in single_process}
    assert sorted(r["id"] for r in rows) == sorted(expected)
    for row in rows:
        want = expected[row["id"]]
        assert (row["text"], row["completion_tokens"], row["finish_reason"]) == (
            want["text"], want["completion_tokens"], want["finish_reason"])
        assert row["index"] == next(i for i, r in enumerate(requests) if r.id == row["id"])


def test_cuda_engines_need_gpus_in_the_cluster() -> None:
    config = JobConfig(model=TINY_MODEL_NAME, device="cuda", ray=RayConfig())
    with pytest.raises(SettingError, match="has no GPU"):
        _num_engines(config, gpus=0)
    assert _num_engines(config, gpus=4) == 4
    with pytest.raises(SettingError, match="has 2 GPU"):
        _num_engines(JobConfig(model=TINY_MODEL_NAME, device="cuda",
                               ray=RayConfig(num_engines=3)), gpus=2)
    assert _num_engines(JobConfig(model=TINY_MODEL_NAME, ray=RayConfig()), gpus=0) == 1


def test_a_request_row_is_the_request() -> None:
    for index, request in enumerate(read_requests(sample_input())):
        row = request_row(index, request)
        assert row.pop("index") == index
        assert request_from_dict(json.loads(json.dumps(row))) == request
    ids = GenRequest("t", token_ids=(1, 2), seed=3, stop=("x",))
    nulls = {"prompt": None, "messages": None, "top_p": None}  # a dataset's absent fields
    rows = [request_row(5, ids) | nulls, request_row(0, ids) | {"index": None}]
    assert _requests(rows) == [(5, ids), (1, ids)]  # no index: its position in the batch
    with pytest.raises(InputError, match=r"row 't': needs exactly one of.*row 1: 'id'"):
        _requests([request_row(0, ids) | {"prompt": "x"}, {"prompt": "y"}])


def test_a_step_survives_its_trip_from_an_engine() -> None:
    step = StepStats("decode", 0.5, ((3, 1), (7, 1)), 1024, 0.1, 0.3, (4, 5))
    assert StepStats.from_dict(json.loads(json.dumps(step.to_dict()))) == step
    bare = StepStats("prefill", 0.1, ((0, 9),), 0, 0.0, 0.0)
    assert StepStats.from_dict(json.loads(json.dumps(bare.to_dict()))) == bare


def test_ray_without_ray_installed_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "ray" else find_spec(name, *args))
    result = CliRunner().invoke(app, ["run", "--ray", "--device", "cpu"])
    assert result.exit_code == 1
    assert "--ray needs Ray: install the moe-gen[ray] extra" in result.output
    assert "Traceback" not in result.output
