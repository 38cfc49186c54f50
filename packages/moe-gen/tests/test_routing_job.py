"""Benchmark routing in a job (`JobConfig.routing`, `moe-gen run --routing`) on the embedded model:
uniform routing spreads a decode step over more experts than the model's own routers (measured
`experts_activated`), is repeatable from the job's seed, never changes the shape of the output,
is recorded in the run record and the summary, applies on a Ray engine actor's own model, and a
bad spec is one line before anything loads."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from moe_core import TINY_MODEL_NAME, ModelSpec, SettingError, load_model, tiny_model_path
from moe_gen import Defaults, JobConfig, read_requests, run_job
from moe_gen.api import default_plan
from moe_gen.cli import app
from moe_gen.job_engine import benchmark_routing
from moe_gen.job_record import JobRecord
from typer.testing import CliRunner

RunRecord = pytest.importorskip("moe_cap").RunRecord  # the reader of our run records

NEW = 4
NUM_SEQUENCES = 8
SPEC = ModelSpec.from_pretrained(tiny_model_path())


def same_prompt(folder: Path) -> Path:
    """Eight copies of one prompt: decoded greedily side by side, their tokens are the same at
    every step, so the model's own routers send them all to the same K experts per layer (as
    dummy weights do with any prompts)."""
    path = folder / "in.jsonl"
    path.write_text("".join(json.dumps({"id": f"r{i}", "prompt": "Once upon a time, there was "
                                        "a little fox who"}) + "\n"
                            for i in range(NUM_SEQUENCES)))
    return path


def job(folder: Path, name: str, routing: str | None, seed: int = 0) -> JobConfig:
    return JobConfig(model=TINY_MODEL_NAME, input=same_prompt(folder), output=folder / name,
                     defaults=Defaults(max_new_tokens=NEW, seed=seed), eos=False,
                     gpu_memory_bytes=1 << 30, routing=routing)


def decode_counts(record: dict[str, object] | None) -> list[tuple[int, ...]]:
    """Distinct experts per MoE layer of each decode step, as the run record measured them."""
    assert record is not None
    steps = record["steps"]
    assert isinstance(steps, list)
    return [tuple(s["experts_activated"]) for s in steps if s["phase"] == "decode"]


def results(path: Path) -> dict[str, dict[str, object]]:
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict, Path]]:
    """The same job with the model's routers, uniform routing twice from seed 0, and once from
    seed 1; each run's record and output."""
    tmp = tmp_path_factory.mktemp("routing")
    out = {}
    for name, routing, seed in (("own", None, 0), ("uniform", "uniform", 0),
                                ("again", "uniform", 0), ("seed1", "uniform", 1)):
        outcome = run_job(job(tmp, f"{name}.jsonl", routing, seed))
        assert outcome.routing == routing
        out[name] = (outcome.record, tmp / f"{name}.jsonl")
    return out


def test_uniform_routing_activates_more_experts_per_decode_step(runs: dict) -> None:
    own, uniform = decode_counts(runs["own"][0]), decode_counts(runs["uniform"][0])
    top_k, layers = SPEC.moe.router.top_k, SPEC.num_moe_layers
    assert len(own) == len(uniform) == NEW - 1  # the first token comes from the prefill
    assert all(len(c) == layers for c in own + uniform)
    # Own routing: the eight identical sequences share their K experts in every layer.
    assert all(c == (top_k,) * layers for c in own)
    # Uniform: each of the eight tokens draws its own K of E experts.
    assert all(top_k < n <= min(SPEC.moe.num_experts, NUM_SEQUENCES * top_k)
               for c in uniform for n in c)
    assert sum(map(sum, uniform)) > 3 * sum(map(sum, own))


def test_uniform_routing_is_repeatable_from_the_seed(runs: dict) -> None:
    assert decode_counts(runs["again"][0]) == decode_counts(runs["uniform"][0])
    assert results(runs["again"][1]) == results(runs["uniform"][1])
    assert decode_counts(runs["seed1"][0]) != decode_counts(runs["uniform"][0])


def test_routing_changes_the_experts_not_the_shape_of_the_output(runs: dict) -> None:
    own, uniform = results(runs["own"][1]), results(runs["uniform"][1])
    assert own.keys() == uniform.keys()
    for key, row in own.items():
        assert (row["prompt_tokens"], row["completion_tokens"], row["finish_reason"]) == (
            uniform[key]["prompt_tokens"], uniform[key]["completion_tokens"],
            uniform[key]["finish_reason"]) == (row["prompt_tokens"], NEW, "length")
    assert own != uniform  # other experts ran, so other tokens came out


def test_the_run_record_says_which_routing(runs: dict) -> None:
    own, uniform = runs["own"][0], runs["uniform"][0]
    assert "routing" not in own and uniform["routing"] == "uniform"
    assert RunRecord.from_dict(uniform).routing == "uniform"
    assert RunRecord.from_dict(own).routing is None


def test_the_routing_leaves_the_callers_generator_as_it_was() -> None:
    model = load_model(TINY_MODEL_NAME, "cpu")
    hidden = torch.randn(5, SPEC.hidden_size)
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    block = model.moe_blocks()[0]
    drawn = []
    for _ in range(2):
        with benchmark_routing(model, "uniform", seed=7):
            override = block.routing_override
            assert override is not None
            drawn.append(override(hidden)[0])  # [T, K] expert ids
    assert torch.equal(drawn[0], drawn[1])  # seeded: the same draws
    assert block.routing_override is None  # the model's own routers again
    assert torch.equal(torch.rand(3), expected)


def test_a_resumed_job_keeps_its_routing_and_its_record(tmp_path: Path) -> None:
    class Interrupt(Exception):
        pass

    def stop(_: object) -> None:
        raise Interrupt

    config = job(tmp_path, "o.jsonl", "uniform")
    with pytest.raises(Interrupt):
        run_job(config, on_result=stop)
    done = len(results(config.output))
    assert 0 < done < NUM_SEQUENCES
    first = json.loads(JobRecord(config.output, fresh=False).path.read_text())
    outcome = run_job(config)
    assert outcome.skipped == done and len(results(config.output)) == NUM_SEQUENCES
    assert all(r["completion_tokens"] == NEW for r in results(config.output).values())
    assert outcome.record is not None and outcome.record["routing"] == "uniform"
    # The job's record: the interrupted run's steps and the resumed run's.
    assert RunRecord.from_dict(outcome.record).output_tokens == (
        first["output_tokens"] + outcome.summary.output_tokens)


def test_a_run_with_other_routing_starts_the_record_afresh(tmp_path: Path) -> None:
    base = {"model": "m", "weight_dtype": "fp32", "wall_seconds": 1.0, "input_tokens": 1,
            "output_tokens": 1, "steps": [{"phase": "decode"}]}
    record = JobRecord(tmp_path / "o.jsonl", fresh=True)
    record.stored = {**base, "engine": "moe-gen", "routing": "uniform"}
    assert record.joined({**base, "routing": "uniform"})["output_tokens"] == 2  # type: ignore[index]
    assert record.joined(base) == base  # own routers now: only this run's steps
    assert record.joined({**base, "routing": "zipf"}) == {**base, "routing": "zipf"}


def test_a_ray_engine_routes_its_own_model(tmp_path: Path) -> None:
    """The engine actor of a job on Ray (called here in this process) loads its own model and
    applies the job's routing to it."""
    pa = pytest.importorskip("pyarrow")
    from moe_gen.ray_data import EngineActor, request_row

    requests = read_requests(same_prompt(tmp_path))
    plan = default_plan(NUM_SEQUENCES, 32 + NEW)
    counts = {}
    for routing in (None, "uniform"):
        actor = EngineActor(replace(job(tmp_path, "unused.jsonl", routing), plan=plan), 1)
        rows = actor(pa.Table.from_pylist([request_row(i, r) for i, r in enumerate(requests)]))
        stats = json.loads(rows.to_pylist()[-1]["engine_stats"])
        counts[routing] = [sum(s["experts_activated"]) for s in stats["steps"]
                           if s["phase"] == "decode"]
    own, uniform = counts[None], counts["uniform"]
    assert own and all(n == SPEC.moe.router.top_k * SPEC.num_moe_layers for n in own)
    assert len(uniform) == len(own) and min(uniform) > max(own)


@pytest.mark.parametrize("spec", ["zipf:q=1", "bogus", "zipf:s=-1"])
def test_a_bad_spec_is_one_line_before_anything_loads(tmp_path: Path, spec: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SettingError, match=f"^--routing {spec!r}: "):
        JobConfig(model=TINY_MODEL_NAME, routing=spec)

    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("moe_gen.job.load_for_generation", no_load)
    out = tmp_path / "o.jsonl"
    result = CliRunner().invoke(app, ["run", "--device", "cpu", "--routing", spec,
                                      "--output", str(out)])
    assert result.exit_code == 1
    assert result.output.strip().startswith(f"error: --routing {spec!r}: ")
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not out.exists()


def test_cli_run_with_routing(tmp_path: Path) -> None:
    out, record, report = tmp_path / "o.jsonl", tmp_path / "rr.json", tmp_path / "report.json"
    result = CliRunner().invoke(app, [
        "run", "--device", "cpu", "--input", str(same_prompt(tmp_path)), "--max-new-tokens",
        str(NEW), "--ignore-eos", "--routing", "uniform", "--seed", "5", "--output", str(out),
        "--json", str(record), "--report", str(report)])
    assert result.exit_code == 0, result.output
    assert "routing: uniform" in result.output
    parsed = RunRecord.from_json(record)
    assert parsed.routing == "uniform"
    assert json.loads(report.read_text())["routing"] == "uniform"
    steps = [s for s in parsed.steps if s.phase == "decode"]
    assert steps and all(n > SPEC.moe.router.top_k for s in steps
                         for n in s.experts_activated or ())
