"""The run record: a round trip through JSON, and errors that name the field at fault."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from moe_cap import Chunk, RunRecord, RunRecordError, StepRecord, decode_batch


def example() -> dict[str, object]:
    return {
        "format": "moe-cap/run-record", "version": 1, "engine": "moe-gen 0.1.0",
        "model": "mixtral-8x7b", "num_layers": 8, "weight_dtype": "bfloat16",
        "kv_dtype": "bf16", "gpu": "H200", "cpu": "EPYC 9654", "dram_gib": 125,
        "wall_seconds": 2.0, "input_tokens": 1024, "output_tokens": 2,
        "gpu_energy_j": 900.5,
        "steps": [
            {"phase": "prefill", "seconds": 0.5, "chunks": [[0, 512], [0, 512]], "h2d_bytes": 0},
            {"phase": "decode", "seconds": 0.02, "chunks": [[512, 1], [512, 1]],
             "h2d_bytes": 123456, "experts_activated": [3, 4, 4, 3, 2, 4, 3, 4]},
        ],
    }


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    path.write_text(json.dumps(example()))
    record = RunRecord.from_json(path)
    assert record.steps[0].chunks == (Chunk(0, 512),) * 2
    assert record.steps[1].experts_activated == (3, 4, 4, 3, 2, 4, 3, 4)
    assert record.steps[0].num_tokens == 1024
    assert record.phase_seconds("decode") == 0.02
    again = tmp_path / "again.json"
    record.to_json(again)
    assert RunRecord.from_json(again) == record
    assert json.loads(again.read_text()) == example()


def _error(data: object, tmp_path: Path) -> str:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(RunRecordError) as info:
        RunRecord.from_json(path)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(("change", "expected"), [
    (lambda d: d.pop("gpu"), "gpu is missing"),
    (lambda d: d.update(wall_seconds=-1), "wall_seconds must be a positive number"),
    (lambda d: d.update(wall_seconds=0.1), "wall_seconds (0.1) is less than the steps' total"),
    (lambda d: d.update(version=2), "version must be 1"),
    (lambda d: d.update(kv_dtype="fp7"), "kv_dtype: unknown precision 'fp7'"),
    (lambda d: d.update(input_tokens=1.5), "input_tokens must be a non-negative integer"),
    (lambda d: d.update(colour="red"), "unknown field(s) ['colour']"),
    (lambda d: d["steps"][1].update(seconds=0), "steps[1].seconds must be a positive number"),
    (lambda d: d["steps"][1].update(phase="idle"), "steps[1].phase must be 'prefill'"),
    (lambda d: d["steps"][0].update(chunks=[[0, 0]]), "steps[0].chunks[0] must be"),
    (lambda d: d["steps"][0].pop("chunks"), "steps[0].chunks is missing"),
    (lambda d: d["steps"][1].update(h2d_bytes=-5), "steps[1].h2d_bytes must be"),
    (lambda d: d.update(steps=[]), "steps must list at least one step"),
])
def test_errors_name_the_field(change: object, expected: str, tmp_path: Path) -> None:
    data = example()
    change(data)  # type: ignore[operator]
    message = _error(data, tmp_path)
    assert expected in message
    assert message.startswith(str(tmp_path))


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(RunRecordError, match="no such run record"):
        RunRecord.from_json(tmp_path / "missing.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(RunRecordError, match="not a JSON run record"):
        RunRecord.from_json(tmp_path / "x.json")
    with pytest.raises(RunRecordError, match="must be a JSON object"):
        RunRecord.from_dict([1, 2])


def test_direct_construction_validates() -> None:
    with pytest.raises(RunRecordError, match=r"StepRecord\.seconds"):
        StepRecord("decode", 0.0, decode_batch(1, 1))
    with pytest.raises(RunRecordError, match="output_tokens"):
        RunRecord(engine="e", model="m", weight_dtype="bf16", kv_dtype="bf16", gpu="H200",
                  wall_seconds=1.0, input_tokens=0, output_tokens=0,
                  steps=(StepRecord("decode", 0.5, decode_batch(1, 1)),))
