"""The planner's host memory: the expert store, the KV pages, the mover's staging, the host's
attention copies and the loading peak; every plan's peak stays within `--host-memory`, and large
budgets plan batches of thousands of sequences."""

from __future__ import annotations

import pytest
import torch
from moe_core import ModelSpec, SettingError, resolve_model_path
from moe_gen.cost_model import Candidate, ModelCosts, host_memory
from moe_gen.planner import Budget, make_plan
from moe_gen.profile import DeviceProfile

BF16 = torch.bfloat16
GIB = 1 << 30
PROFILE = DeviceProfile("made-up GPU", h2d_bytes_per_s=50e9, gather_bytes_per_s=20e9,
                        matmul_flops_per_s=500e12, attention_keys_per_s=4e8,
                        cpu_attention_keys_per_s=1e7, cpu_matmul_flops_per_s=1e12, launch_s=1e-5)


@pytest.fixture(scope="module")
def qwen() -> ModelSpec:
    spec = ModelSpec.from_pretrained(resolve_model_path("qwen3-30b-a3b", weights=False))
    return spec.truncated(24)


def budget(host: int, gpu: int = 16 * GIB, requests: int = 4096) -> Budget:
    return Budget(gpu_bytes=gpu, host_bytes=host, prompt_tokens=512, max_new_tokens=256,
                  num_requests=requests, reserve_bytes=3 << 29)


def test_host_memory_adds_up_its_parts(qwen: ModelSpec) -> None:
    costs = ModelCosts.of(qwen, BF16)
    c = Candidate(batch=1024, micro_batch=128, num_resident=0, prefill_tokens=8192,
                  cpu_share=0.25)
    memory = host_memory(costs, c, 768)
    assert memory.experts == 24 * 128 * 3 * 2048 * 768 * 2
    assert memory.kv_pages == 1024 * 768 * costs.kv_bytes_per_token
    # Two staging buffers per gather in flight; one layer of the whole batch's KV in flight.
    assert memory.staging == 2 * 1024 * 768 * costs.kv_bytes_per_token // 24
    assert memory.host_attention == 24 * qwen.attention.num_params(2048) * 2
    assert memory.loading == costs.dense_bytes + memory.experts + memory.experts // 24
    assert memory.running == (memory.experts + memory.kv_pages + memory.staging
                              + memory.host_attention)
    assert memory.peak == max(memory.running, memory.loading)
    fp8 = host_memory(ModelCosts.of(qwen, BF16, fp8_experts=True), c, 768)
    assert fp8.experts < memory.experts // 2 + memory.experts // 50  # e4m3 plus its scales
    assert host_memory(costs, Candidate(1024, 128, 0, 8192), 768).host_attention == 0


@pytest.mark.parametrize("host_gib", [40, 48, 64, 96, 128, 256, 500])
def test_every_plan_peaks_within_the_host_budget(qwen: ModelSpec, host_gib: int) -> None:
    plan = make_plan(qwen, BF16, PROFILE, budget(host_gib * GIB))
    assert plan.host_memory is not None
    assert plan.host_memory.peak <= host_gib * GIB
    assert plan.host_memory.kv_pages == (plan.max_batch_size * 768
                                         * ModelCosts.of(qwen, BF16).kv_bytes_per_token)


def test_large_host_budgets_plan_thousands_of_sequences(qwen: ModelSpec) -> None:
    small = make_plan(qwen, BF16, PROFILE, budget(40 * GIB))  # S3: 16 GiB of GPU memory
    large = make_plan(qwen, BF16, PROFILE, budget(500 * GIB))
    assert small.max_batch_size < large.max_batch_size
    assert 1024 <= large.max_batch_size <= 4096
    assert large.prediction is not None and small.prediction is not None
    assert large.prediction.tokens_per_s > small.prediction.tokens_per_s


def test_a_budget_that_cannot_hold_the_loading_model_is_refused(qwen: ModelSpec) -> None:
    with pytest.raises(SettingError, match=r"loading the model takes .* raise --host-memory"):
        make_plan(qwen, BF16, PROFILE, budget(20 * GIB))
