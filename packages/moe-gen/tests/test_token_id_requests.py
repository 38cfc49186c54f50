"""JSONL requests may carry `token_ids` instead of text, so a model without a tokenizer (a
shipped shape with `--dummy`, a test checkpoint) runs a job; ids outside the vocabulary stop the
job before the model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from moe_gen import Defaults, InputError
from moe_gen.job import JobConfig, run_job
from moe_gen.requests import read_requests


def test_token_ids_are_read_as_the_prompt(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"id": "a", "token_ids": [5, 6, 7], "max_new_tokens": 2}\n')
    (request,) = read_requests(path)
    assert request.token_ids == (5, 6, 7) and request.prompt is None


def job(tmp_path: Path, folder: Path, rows: list[dict[str, object]]) -> JobConfig:
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return JobConfig(model=str(folder), input=source, output=tmp_path / "out.jsonl",
                     defaults=Defaults(max_new_tokens=3), gpu_memory_bytes=1 << 30)


def test_a_model_without_a_tokenizer_runs_token_id_requests(
        tmp_path: Path, tiny_folders: dict[str, Path]) -> None:
    folder = tiny_folders["qwen3_moe"]  # a test checkpoint: no tokenizer files
    outcome = run_job(job(tmp_path, folder, [{"id": "a", "token_ids": [5, 6, 7]},
                                             {"id": "b", "token_ids": [9], "max_new_tokens": 2}]))
    results = {r["id"]: r for r in map(json.loads, (tmp_path / "out.jsonl").read_text()
                                       .splitlines())}
    assert outcome.summary.requests == 2
    assert results["a"]["text"] is None and len(results["a"]["token_ids"]) == 3  # type: ignore[arg-type]
    assert results["b"]["completion_tokens"] == len(results["b"]["token_ids"]) == 2  # type: ignore[arg-type]


def test_ids_outside_the_vocabulary_stop_the_job_first(
        tmp_path: Path, tiny_folders: dict[str, Path]) -> None:
    folder = tiny_folders["qwen3_moe"]
    with pytest.raises(InputError, match=r"line 2: token id 1000000 is outside the model's "
                                         r"vocabulary"):
        run_job(job(tmp_path, folder, [{"id": "a", "token_ids": [5]},
                                       {"id": "b", "token_ids": [1, 1_000_000]}]))
    assert not (tmp_path / "out.jsonl").exists()
