"""`--expert-dtype fp8`: the job streams FP8 experts and says so everywhere (summary, run
record, report); the planner counts FP8's bytes."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from moe_core import ModelSpec, resolve_model_path
from moe_gen.cli import app
from moe_gen.cost_model import ModelCosts
from moe_gen.planner import Budget, make_plan
from moe_gen.profile import DeviceProfile
from typer.testing import CliRunner

PROFILE = DeviceProfile("made-up GPU", h2d_bytes_per_s=50e9, gather_bytes_per_s=20e9,
                        matmul_flops_per_s=500e12, attention_keys_per_s=4e8,
                        cpu_attention_keys_per_s=1e7, cpu_matmul_flops_per_s=1e12, launch_s=1e-5)


def test_fp8_run_says_fp8_in_summary_record_and_report(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    out, record, report = tmp_path / "o.jsonl", tmp_path / "r.json", tmp_path / "rep.json"
    result = CliRunner().invoke(app, ["run", "--device", "cpu", "--max-new-tokens", "3",
                                      "--output", str(out), "--expert-dtype", "fp8",
                                      "--json", str(record), "--report", str(report)])
    assert result.exit_code == 0, result.output
    assert "experts: fp8 (e4m3" in result.stdout
    assert "host memory: process peak" in result.stdout
    data = json.loads(record.read_text())
    assert (data["expert_dtype"], data["compute_dtype"], data["weight_dtype"]) == (
        "fp8", "fp32", "fp32")
    assert json.loads(report.read_text())["expert_dtype"] == "fp8"
    assert len(out.read_text().splitlines()) == 8  # every sample request finished


def test_an_unknown_expert_dtype_is_one_error_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["run", "--device", "cpu", "--output",
                                      str(tmp_path / "o.jsonl"), "--expert-dtype", "int4"])
    assert result.exit_code != 0
    assert result.output.strip().splitlines()[-1].startswith("error: --expert-dtype")
    assert not (tmp_path / "o.jsonl").exists()


def test_the_planner_counts_fp8_bytes() -> None:
    spec = ModelSpec.from_pretrained(resolve_model_path("mixtral-8x7b", weights=False))
    spec = spec.truncated(8)
    bf16 = ModelCosts.of(spec, torch.bfloat16)
    fp8 = ModelCosts.of(spec, torch.bfloat16, fp8_experts=True)
    scales = 4 * (2 * spec.moe.expert_intermediate_size + spec.hidden_size)
    assert fp8.expert_bytes == bf16.expert_bytes // 2 + scales
    assert fp8.dequantize_workspace_bytes >= bf16.expert_bytes  # at least one 16-bit expert
    budget = Budget(gpu_bytes=12 << 30, host_bytes=100 << 30, prompt_tokens=512,
                    max_new_tokens=256, reserve_bytes=1 << 30)
    plain = make_plan(spec, torch.bfloat16, PROFILE, budget)
    small = make_plan(spec, torch.bfloat16, PROFILE, budget, fp8_experts=True)
    assert small.num_resident_experts > plain.num_resident_experts
    assert small.prediction is not None and plain.prediction is not None
    assert small.prediction.expert_pcie_s < plain.prediction.expert_pcie_s
