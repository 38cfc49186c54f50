"""`moe-cap run --engine moe-infinity`'s benchmark options: dummy weights, the fetch path and
routing set by hand, checked before loading and used for the engine's life."""

from __future__ import annotations

from pathlib import Path

import pytest
from moe_cap.core_engine import CoreStreamingEngine
from moe_cap.engine_options import EngineOptions
from moe_cap.errors import TargetError
from moe_cap.load_pattern import LoadPattern
from moe_cap.run_benchmark import RunConfig, run_benchmark
from moe_cap.run_record import RunRecord
from moe_cap.target import GenerationSettings
from moe_cap.workload import WorkItem


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"fetch": "pinned"}, "--fetch must be copy or mapped"),
    ({"fetch": "mapped"}, "--fetch mapped needs --expert-memory"),
    ({"lanes": 2, "expert_memory_bytes": 1 << 20}, "--lanes 2 needs --fetch mapped"),
    ({"routing": "zipf:q=1"}, "--routing 'zipf:q=1'"),
    ({"engine": "moe-gen", "routing": "uniform"}, "are for --engine moe-infinity"),
])
def test_bad_options_are_one_line_errors(kwargs: dict[str, object], message: str) -> None:
    options = {"engine": "moe-infinity", "model": "tiny-moe", **kwargs}
    with pytest.raises(TargetError, match=message):
        EngineOptions(**options)  # type: ignore[arg-type]


def test_uniform_routing_holds_for_the_engine_life() -> None:
    engine = CoreStreamingEngine.load(EngineOptions(
        engine="moe-infinity", model="tiny-moe", dummy=True, num_layers=2,
        expert_memory_bytes=8 << 20, fetch="mapped", routing="uniform"), "test")
    assert all(b.routing_override is not None for b in engine.model.moe_blocks())


def test_dummy_mapped_uniform_run(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    items = [WorkItem("a", prompt="one two three four", max_tokens=4, ignore_eos=True)]
    run_benchmark(EngineOptions(engine="moe-infinity", model="tiny-moe", dummy=True,
                                num_layers=2, expert_memory_bytes=8 << 20, fetch="mapped",
                                routing="uniform"), items,
                  RunConfig(record_path=out, load=LoadPattern(concurrency=1),
                            settings=GenerationSettings(max_tokens=4)))
    record = RunRecord.from_json(out)
    assert record.output_tokens == 4 and record.num_layers == 2
