"""The moe-gen benchmark scripts on the CPU: the pieces the GPU run relies on (dummy FP8 experts
with real scales, the planner's breakdown, the shares measured) and the scripts end to end on the
embedded tiny model, so a one-shot GPU run cannot fail on a typo, a flag or the JSON it writes
(issue 18's S1/S3 runs: `benchmarks/moe_gen_s1.py`, `benchmarks/host_attention_kernel.py`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from moe_core import FP8, ModelSpec, parse_bytes, tiny_model_path
from moe_gen.cost_model import ModelCosts
from moe_gen.planner import Budget, make_plan
from moe_gen.profile import DeviceProfile

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from dummy_weights import dummy_store  # noqa: E402
from steady_decode import plan_breakdown, share_list  # noqa: E402


def tiny_spec() -> ModelSpec:
    return ModelSpec.from_pretrained(tiny_model_path())


def test_fp8_dummy_store_holds_valid_blocks_with_real_scales() -> None:
    spec = tiny_spec()
    store = dummy_store(spec, torch.float32, pin=False, fp8=True)
    layout = store.layout
    assert layout.dtype == FP8
    assert store.nbytes == spec.num_moe_layers * spec.moe.num_experts * layout.nbytes
    for expert in (store.experts()[0], store.experts()[-1]):
        block = store.block(expert)
        gate_up, down = layout.dequantized_grouped(block[None], torch.float32)
        for scale in layout.scale_views(block):
            assert torch.isfinite(scale).all() and (scale > 0).all()
        for weights in (gate_up, down):
            assert weights.abs().max() <= 0.02 * 1.07  # noise in [-0.02, 0.02], e4m3 rounding
            assert weights.abs().max() > 0.01  # not zeros: each row's amax is ~0.02


def test_bf16_dummy_store_is_noise_not_zeros() -> None:
    store = dummy_store(tiny_spec(), torch.float32, pin=False)
    arena = store.arena(store.moe_layers[-1])
    assert arena.dtype == torch.float32
    assert arena.abs().max() <= 0.0201 and arena.abs().mean() > 0.005  # bf16 rounding


def test_share_list_puts_the_planned_share_in_and_each_once() -> None:
    assert share_list("planned,0,0.25", 0.375) == (0.375, 0.0, 0.25)
    assert share_list("planned,0", 0.0) == (0.0,)
    assert share_list("0.5, planned", 0.5) == (0.5,)


def test_plan_breakdown_at_the_planned_share_is_the_plans_prediction() -> None:
    spec = ModelSpec.from_pretrained(tiny_model_path())
    profile = DeviceProfile("NVIDIA H200", 53e9, 85e9, 5.6e14, 3.4e7, 2e7, 1.5e12, 7.9e-6,
                            "numba")
    budget = Budget(gpu_bytes=parse_bytes("24MiB"), host_bytes=parse_bytes("1GiB"),
                    prompt_tokens=64, max_new_tokens=32, num_requests=64)
    plan = make_plan(spec, torch.bfloat16, profile, budget)
    costs = ModelCosts.of(spec, torch.bfloat16)
    row = plan_breakdown(costs, profile, plan, 64 + 16, plan.cpu_attention_share)
    assert plan.prediction is not None
    assert row["step_s"] == pytest.approx(plan.prediction.step_s)
    assert row["bound_s"] == pytest.approx(plan.prediction.bound_s)
    # The bytes behind the PCIe terms: they cross at the profiled rate in the predicted times.
    assert row["expert_bytes"] / profile.h2d_bytes_per_s == pytest.approx(row["expert_pcie_s"])
    assert row["kv_bytes_over_pcie"] / profile.h2d_bytes_per_s == pytest.approx(
        row["kv_pcie_s"])


def run_script(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


@pytest.mark.slow
def test_s1_script_steady_and_full_run_on_the_tiny_model(tmp_path: Path) -> None:
    """Steady state at two shares (the host one through the host path), then the full run at
    the faster of them; the record holds what the GPU run reports."""
    done = run_script("benchmarks/moe_gen_s1.py", "--out", str(tmp_path), "--scenarios", "tiny",
                      "--num-prompts", "4", "--prompt-tokens", "16", "--new-tokens", "4",
                      "--gpu-memory", "20MiB", "--skip-peer", "--steady-steps", "1",
                      "--steady-warmup", "0", "--steady-shares", "planned,0.5",
                      "--host-kernel", "torch", "--full-share", "auto")
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "moe-gen-tiny.json").read_text())
    ours = record["ours"]
    assert "error" not in ours and "full_run_error" not in ours
    assert record["routing"]["spec"] == "uniform" and record["expert_dtype"] == "bf16"
    assert [r["cpu_attention_share"] for r in ours["steady"]] == [0.0, 0.5]
    for row in ours["steady"]:
        assert row["step_s"] > 0 and row["decode_tokens_per_s"] > 0
        assert row["expert_bytes_per_step"] > 0  # 20 MiB: experts stream
        assert row["predicted"]["bound_s"] > 0
        assert row["prepare_s"] > 0 and "tail_s" in row
    fastest = min(ours["steady"], key=lambda r: r["step_s"])["cpu_attention_share"]
    assert ours["full_run_plan"]["cpu_attention_share"] == fastest
    assert ours["summary"]["output_tokens"] == 4 * 4
    full = ours["full_batch_decode"]  # the full-batch decode steps against their own bound
    assert full["steps"] == ours["decode_steps"] > 0
    assert full["bound_seconds"] > 0 and full["bound_over_measured"] > 0
    assert ours["plan_breakdown"]["expert_bytes"] > 0
    assert ours["host_memory_end"]["peak_rss_bytes"] > 0
    assert ours["peak_rss_within_host_budget"] is True
    assert not list(tmp_path.glob("*.tmp"))
    assert "full run share" in done.stdout  # the table


@pytest.mark.slow
def test_s1_script_fp8_steady_only(tmp_path: Path) -> None:
    done = run_script("benchmarks/moe_gen_s1.py", "--out", str(tmp_path), "--scenarios", "tiny",
                      "--num-prompts", "4", "--prompt-tokens", "16", "--new-tokens", "4",
                      "--gpu-memory", "20MiB", "--skip-peer", "--steady-steps", "1",
                      "--steady-warmup", "0", "--expert-dtype", "fp8", "--steady-only",
                      "--steady-kv-gathers", "planned,staged,mapped")
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "moe-gen-tiny-fp8-steady.json").read_text())
    ours = record["ours"]
    assert record["mode"] == "steady-state only" and "summary" not in ours
    assert [r["kv_gather"] for r in ours["steady"]] == ["staged", "mapped"]  # planned: staged
    assert all("error" not in r and r["step_s"] > 0 for r in ours["steady"])
    assert ours["steady"][0]["expert_bytes_per_step"] > 0
    assert record["expert_dtype"] == "fp8"
    assert ours["store_bytes"] == ours["plan"]["host_memory"]["experts"]  # FP8 bytes planned


def test_s1_script_refuses_bad_flags_in_one_line() -> None:
    done = run_script("benchmarks/moe_gen_s1.py", "--out", "/nonexistent", "--scenarios", "s4")
    assert done.returncode == 2 and "unknown scenarios ['s4']" in done.stderr
    done = run_script("benchmarks/moe_gen_s1.py", "--out", "/nonexistent", "--full-share", "x")
    assert done.returncode == 2 and "--full-share" in done.stderr


@pytest.mark.slow
def test_host_attention_kernel_script_reports_copy_bandwidth(tmp_path: Path) -> None:
    out = tmp_path / "kernel.json"
    done = run_script("benchmarks/host_attention_kernel.py", "--out", str(out), "--threads",
                      "4096", "--batch", "2", "--keys", "48")  # more threads than any host has
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    runs = record["runs"]
    assert {r["shape"] for r in runs} == {"mixtral-gqa", "qwen3-30b-a3b-gqa",
                                          "deepseek-v2-lite-mla"}
    for run in runs:  # the host's most threads, said so; the copy bandwidth beside the kernel's
        assert run["threads"] == record["numba_max_threads"] <= 4096
        assert run["copy_gb_per_s"] > 0 and run["kv_gb_per_s"] > 0
        assert run["share_of_copy"] == pytest.approx(run["kv_gb_per_s"] / run["copy_gb_per_s"])
