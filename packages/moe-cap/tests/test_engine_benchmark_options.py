"""`moe-cap run --engine moe-infinity`'s benchmark options: dummy weights, the fetch path and
routing set by hand, checked before loading and used for the engine's life; `--engine moe-gen`
takes the routing too (its job's), and is refused the fetch path."""

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
    ({"engine": "moe-gen", "routing": "zipf:q=1"}, "--routing 'zipf:q=1'"),
    ({"engine": "moe-gen", "fetch": "mapped", "expert_memory_bytes": 1 << 20},
     "^--fetch and --lanes are for --engine moe-infinity$"),
    ({"engine": "moe-gen", "lanes": 2}, "^--fetch and --lanes are for --engine moe-infinity$"),
    ({"expert_dtype": "int4", "expert_memory_bytes": 1 << 20}, "--expert-dtype must be fp8"),
    ({"engine": "moe-gen", "expert_dtype": "bf16"}, "--expert-dtype must be fp8"),
    ({"expert_dtype": "fp8"}, "--expert-dtype fp8 needs --expert-memory"),
    ({"prefill": "evict", "expert_memory_bytes": 1 << 20}, "--prefill must be admit or stream"),
    ({"prefill": "stream"}, "--prefill stream is for --engine moe-infinity with --expert-memory"),
    ({"engine": "moe-gen", "prefill": "stream"}, "--prefill stream is for --engine moe-infinity"),
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


def test_streamed_prefill_reaches_the_offloaded_runtime() -> None:
    engine = CoreStreamingEngine.load(EngineOptions(
        engine="moe-infinity", model="tiny-moe", dummy=True, num_layers=2,
        expert_memory_bytes=8 << 20, fetch="mapped", prefill="stream"), "test")
    assert engine.runtime is not None and engine.runtime.prefill_ring is not None
    default = CoreStreamingEngine.load(EngineOptions(
        engine="moe-infinity", model="tiny-moe", dummy=True, num_layers=2,
        expert_memory_bytes=8 << 20, fetch="mapped"), "test")
    assert default.runtime is not None and default.runtime.prefill_ring is None


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


def test_the_record_says_which_routing_the_engine_ran(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    items = [WorkItem("a", prompt="one two", max_tokens=2, ignore_eos=True)]
    outcome = run_benchmark(EngineOptions(engine="moe-infinity", model="tiny-moe",
                                          routing="zipf:s=1.1,reuse=0.5"), items,
                            RunConfig(record_path=out, settings=GenerationSettings(max_tokens=2)))
    assert outcome.record.routing == "zipf:s=1.1,reuse=0.5"
    assert RunRecord.from_json(out).routing == "zipf:s=1.1,reuse=0.5"
    run_benchmark(EngineOptions(engine="moe-infinity", model="tiny-moe"), items,
                  RunConfig(record_path=out, settings=GenerationSettings(max_tokens=2)))
    assert RunRecord.from_json(out).routing is None


def test_moe_gen_runs_with_the_routing_and_records_it(tmp_path: Path) -> None:
    """`moe-cap run --engine moe-gen --routing uniform`: eight copies of one prompt decode side
    by side, so the model's own routers send all eight to the same K experts per layer; under
    uniform routing each token draws its own, and the record says which routing ran."""
    from moe_cap.cli import app
    from moe_core import ModelSpec, tiny_model_path
    from typer.testing import CliRunner

    pytest.importorskip("moe_gen")
    workload = tmp_path / "w.jsonl"
    workload.write_text('{"prompt": "Once upon a time, there was a little fox who"}\n' * 8)
    moe = ModelSpec.from_pretrained(tiny_model_path()).moe
    decode: dict[str | None, list[tuple[int, ...]]] = {}
    for routing in (None, "uniform"):
        out = tmp_path / f"{routing}.json"
        argv = ["run", "--engine", "moe-gen", "--workload", str(workload), "--max-tokens", "4",
                "--out", str(out), "--json", *(["--routing", routing] if routing else [])]
        result = CliRunner().invoke(app, argv)
        assert result.exit_code == 0, result.output
        record = RunRecord.from_json(out)
        assert record.routing == routing and record.engine.startswith("moe-gen ")
        assert record.serving is not None and record.serving.num_requests == 8
        decode[routing] = [s.experts_activated or () for s in record.steps
                           if s.phase == "decode"]
    assert decode[None] and all(set(c) == {moe.router.top_k} for c in decode[None])
    assert decode["uniform"] and all(moe.router.top_k < n for c in decode["uniform"] for n in c)


def test_fp8_experts_run_offloaded_and_the_record_says_so(tmp_path: Path) -> None:
    """`moe-cap run --engine moe-infinity --expert-memory M --expert-dtype fp8`: the experts are
    e4m3 in the runtime, and the record keeps the model dtype as `weight_dtype` and names the
    experts' `expert_dtype` (as moe-gen's FP8 records do)."""
    out = tmp_path / "r.json"
    items = [WorkItem("a", prompt="one two three", max_tokens=3, ignore_eos=True)]
    options = EngineOptions(engine="moe-infinity", model="tiny-moe",
                            expert_memory_bytes=2 << 20, expert_dtype="fp8")
    engine = CoreStreamingEngine.load(options, "test")
    assert engine.runtime is not None and engine.runtime.store.layout.is_fp8
    run_benchmark(options, items, RunConfig(record_path=out,
                                            settings=GenerationSettings(max_tokens=3)))
    record = RunRecord.from_json(out)
    assert record.expert_dtype == "fp8" and record.weight_dtype == "fp32"
    assert record.output_tokens == 3


def test_the_cli_refuses_a_bad_expert_dtype_in_one_line() -> None:
    from moe_cap.cli import app
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["run", "--engine", "moe-infinity", "--expert-memory",
                                      "2MiB", "--expert-dtype", "fp4"])
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "--expert-dtype must be fp8" in lines[0], result.output
