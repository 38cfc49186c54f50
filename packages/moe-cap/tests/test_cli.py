"""The moe-cap command line: results on stdout (`--json` parses), one-line errors and exit 1."""

from __future__ import annotations

import json
from pathlib import Path

import moe_cap
import moe_core
import pytest
from moe_cap import RunRecord, StepRecord, decode_batch, prefill_batch
from moe_cap.cli import app
from typer.testing import CliRunner, Result


@pytest.fixture(autouse=True)
def no_user_hardware_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MOE_CAP_HARDWARE", raising=False)


def run(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


def assert_one_line_error(result: Result, message: str) -> None:
    assert result.exit_code == 1, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""


@pytest.fixture
def run_record(tmp_path: Path) -> Path:
    path = tmp_path / "run.json"
    RunRecord(engine="moe-gen 0.1.0", model="mixtral-8x7b", num_layers=8, weight_dtype="bf16",
              kv_dtype="bf16", gpu="H200", cpu="EPYC 9654", dram_gib=125.0, wall_seconds=3.0,
              input_tokens=2048, output_tokens=4, gpu_energy_j=1500.0,
              steps=(StepRecord("prefill", 1.0, prefill_batch(4, 512)),
                     StepRecord("decode", 1.0, decode_batch(4, 512), h2d_bytes=10**9))
              ).to_json(path)
    return path


def test_help_lists_commands() -> None:
    result = run("--help")
    assert result.exit_code == 0
    for command in ("metrics", "hardware", "cost", "utilisation", "version"):
        assert command in result.output


def test_version_names_both_packages() -> None:
    result = run("version")
    assert result.exit_code == 0
    assert f"moe-cap {moe_cap.__version__}" in result.output
    assert f"moe-core {moe_core.__version__}" in result.output


def test_metrics_json() -> None:
    result = run("metrics", "mixtral-8x7b", "--batch", "1,32", "--context", "1024",
                 "--gpu", "H200", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["gpu"] == "H200" and len(out["rows"]) == 4
    decode1 = next(r for r in out["rows"] if r["phase"] == "decode" and r["batch"] == 1)
    assert decode1["bytes"] == 25_632_063_488  # worked out in test_step_cost.py
    assert decode1["experts_expected_per_layer"] == 2.0
    assert decode1["limit"] == "memory"
    assert decode1["tokens_per_s_ceiling"] == pytest.approx(187.27, rel=1e-4)


def test_metrics_table_with_offload() -> None:
    result = run("metrics", "qwen3-30b-a3b", "--num-layers", "24", "--gpu", "h200",
                 "--gpu-memory", "16GiB", "--peaks", "measured", "--batch", "1")
    assert result.exit_code == 0, result.output
    assert "PCIe ms" in result.stdout and "pcie" in result.stdout
    assert "uniform routing" in result.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["metrics", "mixtral-8x7b", "--gpu", "H300"], "unknown GPU 'H300'"),
    (["metrics", "mixtral-8x7b", "--gpu", "H300"], "MOE_CAP_HARDWARE"),
    (["metrics", "mixtral-8x7b", "--gpu", "H200", "--batch", "1,x"], "comma-separated"),
    (["metrics", "mixtral-8x7b", "--gpu", "H200", "--dtype", "fp7"], "unknown precision"),
    (["metrics", "mixtral-8x7b", "--gpu", "H200", "--dtype", "fp4"], "no fp4 matrix rate"),
    (["metrics", "mixtral-8x7b", "--gpu", "H200", "--peaks", "best"], "--peaks must be"),
    (["metrics", "mixtral-8x7b", "--gpu", "H200", "--gpu-memory", "1GiB"], "exceed the GPU"),
    (["metrics", "/no/such/model", "--gpu", "H200"], "no such model folder"),
    (["metrics", "mixtral-8x7b", "--gpu", "H200", "--hardware-file", "/no/hw.yaml"],
     "does not exist"),
    (["cost", "/no/run.json"], "no such run record"),
    (["utilisation", "/no/run.json"], "no such run record"),
])
def test_user_errors_are_one_line(args: list[str], message: str) -> None:
    assert_one_line_error(run(*args), message)


def test_metrics_without_gpu_and_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    from moe_cap import detect

    monkeypatch.setattr(detect, "local_device_properties", lambda device=0: None)
    assert_one_line_error(run("metrics", "mixtral-8x7b"), "no CUDA GPU is visible")


def test_metrics_defaults_to_the_embedded_model() -> None:
    result = run("metrics", "--gpu", "H200", "--batch", "1", "--context", "64", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["model"] == moe_core.TINY_MODEL_NAME
    spec = moe_core.ModelSpec.from_pretrained(moe_core.tiny_model_path())
    decode = out["rows"][1]
    assert decode["experts_expected_per_layer"] == spec.moe.router.top_k  # one token: k experts


def test_hardware_json_and_table() -> None:
    result = run("hardware", "--json")
    assert result.exit_code == 0
    out = json.loads(result.stdout)
    h200 = next(g for g in out["gpus"] if g["name"] == "H200")
    assert h200["peak_flops_per_s"]["bf16"] == 989.4e12
    assert h200["measured"]["pcie_h2d_bytes_per_s"] == 54.7e9
    assert all(g["source"] for g in out["gpus"]) and out["cpus"] and out["dram"]
    table = run("hardware")
    assert table.exit_code == 0 and "MI300X" in table.stdout and "datasheet" in table.stdout


def test_hardware_file_override(tmp_path: Path) -> None:
    path = tmp_path / "hw.yaml"
    path.write_text("gpus: [{name: H200, price_usd: 12345}]\n")
    out = json.loads(run("hardware", "--json", "--hardware-file", str(path)).stdout)
    assert next(g for g in out["gpus"] if g["name"] == "H200")["price_usd"] == 12345
    bad = tmp_path / "bad.yaml"
    bad.write_text("gpus: [{name: H200, tdp_w: lots}]\n")
    assert_one_line_error(run("hardware", "--hardware-file", str(bad)), "tdp_w: not a number")


def test_cost_json(run_record: Path) -> None:
    result = run("cost", str(run_record), "--json", "--cpu-load", "0.5")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["engine"] == "moe-gen 0.1.0"
    assert out["energy"]["gpu"] == {"joules": 1500.0, "measured": True}
    assert out["energy"]["cpu"]["joules"] == pytest.approx(360 * 0.5 * 3)
    assert out["prefill_share"] == 0.5
    assert set(out["usd_per_hour_parts"]) == {"gpu", "cpu", "dram", "energy"}
    assert out["usd_per_million_output_tokens"] > out["usd_per_million_input_tokens"]


def test_cost_table_and_options(run_record: Path) -> None:
    result = run("cost", str(run_record), "--cloud-usd-per-hour", "3.6")
    assert result.exit_code == 0 and "$ per 1M output tokens" in result.stdout
    assert "cloud" in result.stdout
    no_host = json.loads(run("cost", str(run_record), "--no-host", "--json").stdout)
    assert set(no_host["energy"]) == {"gpu"}
    assert_one_line_error(run("cost", str(run_record), "--utilisation", "2"),
                          "utilisation must be in (0, 1]")
    assert_one_line_error(run("cost", str(run_record), "--cpu", "Z80"), "unknown CPU 'Z80'")


def test_cost_of_a_bad_record_names_the_field(tmp_path: Path, run_record: Path) -> None:
    data = json.loads(run_record.read_text())
    data["steps"][1]["seconds"] = -1
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    assert_one_line_error(run("cost", str(bad)), "steps[1].seconds must be a positive number")


def test_utilisation_json(run_record: Path) -> None:
    result = run("utilisation", str(run_record), "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    phases = out["phases"]
    assert set(phases) == {"prefill", "decode", "all"}
    assert phases["decode"]["aggregate"]["pcie"] == pytest.approx(1e9 / 1.0 / 63e9)
    assert phases["all"]["num_tokens"] == 4 * 512 + 4
    all_mbu = phases["all"]["bytes"] / phases["all"]["seconds"] / 4.8e12
    assert phases["all"]["aggregate"]["s_mbu"] == pytest.approx(all_mbu)
    table = run("utilisation", str(run_record), "--peaks", "measured")
    assert table.exit_code == 0 and "S-MFU" in table.stdout
