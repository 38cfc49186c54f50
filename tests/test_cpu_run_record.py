"""A run record from moe-gen on the CPU is one moe-cap prices and measures: `cost` charges the
host alone, `utilisation` divides by the host CPU's rates (issue 14: both used to refuse it with
"unknown GPU 'none (CPU run)'")."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import moe_gen.job
import pytest
import torch
from moe_cap.cli import app as cap_app
from moe_core import ModelSpec, tiny_model_path
from moe_gen.cli import app as gen_app
from typer.testing import CliRunner, Result


def record_on(tmp: Path, cpu: str | None) -> Path:
    """A real run record: moe-gen on the embedded model, on the CPU, on a host whose kernel
    names its CPU `cpu` (None: names none)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a thread pool only spin-waits
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(moe_gen.job, "cpu_model", lambda: cpu)
            result = CliRunner().invoke(gen_app, [
                "run", "--device", "cpu", "--max-new-tokens", "3", "--host-memory", "16GiB",
                "--output", str(tmp / "out.jsonl"), "--json", str(tmp / "record.json")])
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    return tmp / "record.json"


@pytest.fixture(scope="module")
def cpu_record(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A record from a host that does not name its CPU."""
    yield record_on(tmp_path_factory.mktemp("cpu-run"), None)


@pytest.fixture(scope="module")
def epyc_record(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A record from a host whose kernel names an EPYC 9654 (as /proc/cpuinfo does there)."""
    yield record_on(tmp_path_factory.mktemp("epyc-run"), "AMD EPYC 9654 96-Core Processor")


def test_moe_cap_prices_and_measures_the_record_without_flags(epyc_record: Path) -> None:
    record = json.loads(epyc_record.read_text())
    assert record["cpu"] == "EPYC 9654" and 0 < record["dram_gib"] <= 16
    assert "gpu_energy_j" not in record  # no GPU, so nothing measured it: never made up
    cost = cap("cost", str(epyc_record), "--json")
    assert cost.exit_code == 0, cost.output
    report = json.loads(cost.stdout)
    assert set(report["usd_per_hour_parts"]) == {"cpu", "dram", "energy"}
    assert report["joules_per_token"] > 0
    util = cap("utilisation", str(epyc_record), "--json")
    assert util.exit_code == 0, util.output
    assert json.loads(util.stdout)["cpu"] == "EPYC 9654"


def test_every_step_carries_its_measured_activated_experts(epyc_record: Path) -> None:
    record = json.loads(epyc_record.read_text())
    spec = ModelSpec.from_pretrained(tiny_model_path())
    for step in record["steps"]:
        counts = step["experts_activated"]
        assert len(counts) == spec.num_moe_layers
        tokens = sum(new for _, new in step["chunks"])
        top_k, experts = spec.moe.router.top_k, spec.moe.num_experts
        assert all(top_k <= c <= min(experts, tokens * top_k) for c in counts)


def cap(*args: str) -> Result:
    return CliRunner().invoke(cap_app, list(args))


def test_the_record_says_the_run_used_no_gpu(cpu_record: Path) -> None:
    record = json.loads(cpu_record.read_text())
    assert record["gpu"] == "none" and record["weight_dtype"] == "fp32"


def test_cost_charges_the_host_alone(cpu_record: Path) -> None:
    result = cap("cost", str(cpu_record), "--cpu", "EPYC 9654", "--dram-gib", "16", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report["usd_per_hour_parts"]) == {"cpu", "dram", "energy"}
    assert set(report["energy"]) == {"cpu", "dram"}
    assert report["usd_per_million_output_tokens"] > 0 and report["joules_per_token"] > 0
    assert cap("cost", str(cpu_record), "--cpu", "EPYC 9654", "--dram-gib", "16").exit_code == 0


def test_utilisation_divides_by_the_cpu(cpu_record: Path) -> None:
    result = cap("utilisation", str(cpu_record), "--cpu", "EPYC 9654", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["cpu"] == "EPYC 9654"
    whole = report["phases"]["all"]["aggregate"]
    assert 0 < whole["s_mbu"] < 1 and 0 < whole["s_mfu"] < 1 and whole["pcie"] is None
    table = cap("utilisation", str(cpu_record), "--cpu", "EPYC 9654")
    assert table.exit_code == 0 and "on the CPU alone, EPYC 9654" in table.stdout


@pytest.mark.parametrize("command", ["cost", "utilisation"])
def test_without_a_cpu_name_the_error_asks_for_one(cpu_record: Path, command: str) -> None:
    result = cap(command, str(cpu_record))
    assert result.exit_code == 1
    assert "--cpu NAME" in result.stderr and "unknown GPU" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
