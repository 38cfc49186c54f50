"""The moe-infinity command line: trace the embedded model, simulate, plot, and one-line errors
for user mistakes."""

from __future__ import annotations

import json
from pathlib import Path

import moe_core
import moe_infinity
import pytest
from moe_infinity import TraceCollection, load_traces
from moe_infinity.cli import app
from moe_infinity.png import PNG_SIGNATURE
from typer.testing import CliRunner


def test_help_lists_commands() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("version", "trace", "simulate"):
        assert command in result.output


def test_version_names_both_packages() -> None:
    result = CliRunner().invoke(app, ["version"])
    assert result.exit_code == 0
    assert f"moe-infinity {moe_infinity.__version__}" in result.output
    assert f"moe-core {moe_core.__version__}" in result.output


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cli")
    prompts = folder / "prompts.jsonl"
    lines = moe_infinity.sample_prompts_path().read_text().splitlines()
    prompts.write_text("\n".join(lines[::4]) + "\n")  # one or two per domain
    out = folder / "traces.bin"
    result = CliRunner().invoke(app, ["trace", "--input", str(prompts), "--output", str(out),
                                      "--max-new-tokens", "5", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["requests"] == 7 and summary["decode_tokens"] > 0
    return out


def test_trace_writes_a_trace_file(traced: Path) -> None:
    traces = load_traces(traced)
    assert len(traces) == 7 and traces.shape.model_name == moe_core.TINY_MODEL_NAME


def test_simulate_json_and_plot(traced: Path, tmp_path: Path) -> None:
    plot, kept = tmp_path / "hit.png", tmp_path / "collection.bin"
    result = CliRunner().invoke(app, ["simulate", str(traced), "--cache-fraction", "0.25,0.5",
                                      "--policy", "lru,aware+prefetch,belady", "--plot",
                                      str(plot), "--collection-out", str(kept), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(data["results"]) == 6
    assert {r["policy"] for r in data["results"]} == {"lru", "aware+prefetch", "belady"}
    assert data["model"]["num_experts"] == 16
    assert plot.read_bytes().startswith(PNG_SIGNATURE)
    collection = TraceCollection.load(kept, expect=load_traces(traced).shape)
    assert len(collection) == data["build_requests"]


def test_simulate_table(traced: Path) -> None:
    result = CliRunner().invoke(app, ["simulate", str(traced), "--cache-fraction", "0.25",
                                      "--policy", "lru,belady", "--pcie-gbps", "20"])
    assert result.exit_code == 0, result.output
    assert "belady" in result.stdout and "hit rate" in result.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["simulate", "{missing}"], "cannot read"),
    (["simulate", "{traces}", "--cache-fraction", "0.25,x"], "comma-separated numbers"),
    (["simulate", "{traces}", "--cache-fraction", "1.5"], "cache fraction"),
    (["simulate", "{traces}", "--policy", "fifo"], "unknown eviction"),
    (["simulate", "{traces}", "--build-share", "1.0"], "build share"),
    (["simulate", "{traces}", "--pcie-gbps", "0"], "pcie-gbps"),
    (["simulate", "{prompts}"], "not a moe-infinity traces file"),
    (["trace", "--input", "{missing}"], "cannot read"),
    (["trace", "--input", "{prompts}", "--lookahead-input", "x"], "lookahead_input"),
])
def test_user_mistakes_are_one_line(traced: Path, args: list[str], message: str) -> None:
    paths = {"missing": str(traced.parent / "missing"), "traces": str(traced),
             "prompts": str(traced.parent / "prompts.jsonl")}
    result = CliRunner().invoke(app, [a.format(**paths) for a in args])
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output
