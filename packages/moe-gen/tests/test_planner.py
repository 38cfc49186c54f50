"""The planner and its cost model: plans fit their budgets, more memory never plans slower, the
bound never exceeds the predicted step, and the CPU profile is quick. No assertion depends on a
measured time: the cost-model tests use a fixed, made-up profile."""

from __future__ import annotations

import time

import pytest
import torch
from moe_core import ModelSpec, parse_bytes, resolve_model_path
from moe_gen.cost_model import Candidate, ModelCosts, gpu_bytes, predict
from moe_gen.planner import Budget, make_plan
from moe_gen.profile import DeviceProfile, profile_device

PROFILE = DeviceProfile("made-up GPU", h2d_bytes_per_s=50e9, gather_bytes_per_s=20e9,
                        matmul_flops_per_s=500e12, attention_keys_per_s=4e8,
                        cpu_attention_keys_per_s=1e7, cpu_matmul_flops_per_s=1e12,
                        launch_s=1e-5)
BF16 = torch.bfloat16


@pytest.fixture(scope="module")
def mixtral() -> ModelSpec:
    spec = ModelSpec.from_pretrained(resolve_model_path("mixtral-8x7b", weights=False))
    return spec.truncated(8)


def budget(gpu: str, host: str = "100GiB", requests: int = 4096) -> Budget:
    return Budget(gpu_bytes=parse_bytes(gpu), host_bytes=parse_bytes(host), prompt_tokens=512,
                  max_new_tokens=256, num_requests=requests, reserve_bytes=parse_bytes("1GiB"))


@pytest.mark.parametrize("gpu", ["6GiB", "12GiB", "24GiB"])
def test_plan_fits_the_gpu_budget(mixtral: ModelSpec, gpu: str) -> None:
    plan = make_plan(mixtral, BF16, PROFILE, budget(gpu))
    costs = ModelCosts.of(mixtral, BF16)
    chosen = Candidate(plan.max_batch_size, plan.micro_batch_size, plan.num_resident_experts,
                       plan.max_prefill_tokens, ring=plan.ring_size)
    used = gpu_bytes(costs, chosen, 512 + 128)
    assert used + parse_bytes("1GiB") <= parse_bytes(gpu)
    assert plan.offload  # Mixtral's 22.5 GB of experts never fit these budgets


def test_more_gpu_memory_keeps_more_experts_and_never_plans_slower(mixtral: ModelSpec) -> None:
    plans = [make_plan(mixtral, BF16, PROFILE, budget(g)) for g in ("6GiB", "12GiB", "24GiB")]
    resident = [p.num_resident_experts for p in plans]
    speed = [p.prediction.tokens_per_s for p in plans]  # type: ignore[union-attr]
    assert resident == sorted(resident) and resident[0] < resident[-1]
    assert speed == sorted(speed)


def test_everything_resident_when_the_gpu_holds_the_model(mixtral: ModelSpec) -> None:
    plan = make_plan(mixtral, BF16, PROFILE, budget("60GiB"))
    assert not plan.offload
    assert plan.prediction is not None and plan.prediction.expert_pcie_s == 0


def test_host_memory_bounds_the_batch(mixtral: ModelSpec) -> None:
    roomy = make_plan(mixtral, BF16, PROFILE, budget("12GiB", "100GiB"))
    tight = make_plan(mixtral, BF16, PROFILE, budget("12GiB", "30GiB"))
    assert tight.max_batch_size < roomy.max_batch_size
    assert make_plan(mixtral, BF16, PROFILE, budget("12GiB", requests=8)).max_batch_size <= 8


def test_prediction_terms_and_bound(mixtral: ModelSpec) -> None:
    p = make_plan(mixtral, BF16, PROFILE, budget("12GiB")).prediction
    assert p is not None
    assert p.bound_s <= p.step_s
    assert p.pcie_s == pytest.approx(p.expert_pcie_s + p.kv_pcie_s)
    assert min(p.pcie_s, p.gpu_s, p.cpu_s) >= 0
    assert p.bound_tokens_per_s >= p.tokens_per_s


def test_nothing_fits_is_a_clear_error(mixtral: ModelSpec) -> None:
    with pytest.raises(ValueError, match="nothing fits"):
        make_plan(mixtral, BF16, PROFILE, budget("1GiB"))


def test_budget_is_validated() -> None:
    with pytest.raises(ValueError, match=r"Budget\.gpu_bytes"):
        Budget(gpu_bytes=0, host_bytes=1, prompt_tokens=1, max_new_tokens=1)


def test_cpu_profile_is_quick_and_positive(mixtral: ModelSpec) -> None:
    started = time.perf_counter()
    profile = profile_device(mixtral, "cpu", torch.float32)
    assert time.perf_counter() - started < 10  # a generous ceiling: seconds, not minutes
    rates = [profile.h2d_bytes_per_s, profile.gather_bytes_per_s, profile.matmul_flops_per_s,
             profile.attention_keys_per_s, profile.launch_s]
    assert all(r > 0 for r in rates)


def test_host_attention_share_follows_the_host_rate(mixtral: ModelSpec) -> None:
    from dataclasses import replace

    # A fast host: attention, projections and the gathers of its own share's pages.
    fast = replace(PROFILE, cpu_attention_keys_per_s=1e9, cpu_matmul_flops_per_s=1e14,
                   gather_bytes_per_s=1e12)
    slow = replace(PROFILE, cpu_attention_keys_per_s=1e3, cpu_matmul_flops_per_s=1e6)
    assert make_plan(mixtral, BF16, fast, budget("12GiB")).cpu_attention_share > 0
    assert make_plan(mixtral, BF16, slow, budget("12GiB")).cpu_attention_share == 0
    capped = Budget(gpu_bytes=parse_bytes("12GiB"), host_bytes=parse_bytes("100GiB"),
                    prompt_tokens=512, max_new_tokens=256, num_requests=4096,
                    reserve_bytes=parse_bytes("1GiB"), max_cpu_attention_share=0.0)
    assert make_plan(mixtral, BF16, fast, capped).cpu_attention_share == 0
    on_cpu = replace(fast, device="cpu")  # the host is the device: nothing to split
    assert make_plan(mixtral, BF16, on_cpu, budget("12GiB")).cpu_attention_share == 0


def test_the_plan_attends_the_host_share_with_the_profiled_kernel(mixtral: ModelSpec) -> None:
    from dataclasses import replace

    fast = replace(PROFILE, cpu_attention_keys_per_s=1e9, cpu_matmul_flops_per_s=1e14,
                   gather_bytes_per_s=1e12)
    for kernel in ("torch", "numba"):
        plan = make_plan(mixtral, BF16, replace(fast, cpu_attention_kernel=kernel),
                         budget("12GiB"))
        assert plan.cpu_attention_share > 0 and plan.host_attention_kernel == kernel
    # The paged kernel reads the pages in place: no gather of its share's pages is charged.
    slow_gather = replace(fast, gather_bytes_per_s=1e8)
    c = Candidate(256, 32, 16, 8192, cpu_share=0.5, ring=4)
    costs = ModelCosts.of(mixtral, BF16)
    torch_step = predict(costs, slow_gather, c, 640)
    numba_step = predict(costs, replace(slow_gather, cpu_attention_kernel="numba"), c, 640)
    assert numba_step.cpu_s < torch_step.cpu_s


def test_host_attention_rates_measure_both_kernels(mixtral: ModelSpec) -> None:
    from moe_gen.profile import host_attention_rates

    rates = host_attention_rates(mixtral, BF16, batch=2, keys=64)
    assert set(rates) == {"torch", "numba"} and all(r > 0 for r in rates.values())


def test_kv_copies_overlap_the_expert_stream(mixtral: ModelSpec) -> None:
    from dataclasses import replace

    costs = ModelCosts.of(mixtral, BF16)
    c = Candidate(256, 32, 16, 8192, kv_gather="mapped")
    profile = replace(PROFILE, mapped_gather_bytes_per_s=PROFILE.h2d_bytes_per_s)
    p = predict(costs, profile, c, 640)
    serial = p.expert_pcie_s + p.kv_pcie_s + p.gpu_s
    assert p.bound_s <= p.step_s * (1 + 1e-12) and p.step_s < serial
    # The link's work (experts and KV) adds up, but the expert products hide behind it, and so
    # does the attention while the ring fills ahead of the routing.
    assert p.step_s <= p.pcie_s + p.gpu_s
    # A staged gather holds the link for the host gather too (both go through host memory).
    staged = predict(costs, profile, replace(c, kv_gather="staged"), 640)
    assert staged.cpu_s > 0 and staged.step_s >= p.step_s + 0.9 * staged.cpu_s


def test_a_larger_ring_hides_the_attention_behind_copies_ahead(mixtral: ModelSpec) -> None:
    """Ring slots filled during a layer's attention cover it (up to the layer's own copies);
    without lookahead (a batch that uses few experts) the ring does not matter."""
    costs = ModelCosts.of(mixtral, BF16)
    slow_attention = DeviceProfile("made-up GPU", 50e9, 80e9, 500e12, 4e6, 1e7, 1e12, 1e-5,
                                   mapped_gather_bytes_per_s=50e9)
    steps = [predict(costs, slow_attention, Candidate(256, 32, 16, 8192, ring=r,
                                                      kv_gather="mapped"), 640).step_s
             for r in (2, 4, 8)]
    assert steps[0] > steps[1] > steps[2]
    exposed = predict(costs, slow_attention, Candidate(256, 32, 16, 8192, ring=64,
                                                       kv_gather="mapped"), 640)
    assert exposed.step_s == pytest.approx(max(exposed.bound_s, exposed.gpu_s), rel=0.1)
    small = [predict(costs, slow_attention, Candidate(1, 1, 16, 8192, ring=r,
                                                      kv_gather="mapped"), 640).step_s
             for r in (2, 64)]
    assert small[0] == small[1]
    plan = make_plan(mixtral, BF16, PROFILE, budget("12GiB"))
    assert plan.kv_lookahead == -(-plan.max_batch_size // plan.micro_batch_size)


def test_kv_gathered_ahead_is_counted_in_device_memory(mixtral: ModelSpec) -> None:
    costs = ModelCosts.of(mixtral, BF16)
    c = Candidate(256, 32, 16, 8192)
    short, long = gpu_bytes(costs, c, 640, 640), gpu_bytes(costs, c, 640, 768)
    # One layer of the batch's KV at the longest context (K and V, 8 heads x 128, bf16).
    assert long - short == 256 * 128 * 2 * 8 * 128 * 2


def test_residents_are_spread_over_the_layers_as_the_cost_model_assumes(
        mixtral: ModelSpec) -> None:
    from moe_core import ExpertId
    from moe_gen.model_setup import spread_residents

    experts = [ExpertId(layer, e) for layer in mixtral.moe_layers for e in range(8)]
    chosen = spread_residents(experts, 19)
    per_layer = [sum(x.layer == layer for x in chosen) for layer in mixtral.moe_layers]
    assert len(set(chosen)) == 19 and per_layer == [3, 3, 3, 2, 2, 2, 2, 2]
    streamed = ModelCosts.of(mixtral, BF16).streamed_experts(4096, 19)  # every expert active
    assert [round(s, 6) for s in streamed] == [8 - n for n in per_layer]
    assert spread_residents(experts, 100) == spread_residents(experts, 64)  # all of them


def test_a_marginal_host_share_is_not_worth_its_uncertainty(mixtral: ModelSpec) -> None:
    from dataclasses import replace

    from moe_gen.cost_model import Candidate as C

    costs = ModelCosts.of(mixtral, BF16)
    # A host just fast enough that 1/8 of the batch on it predicts slightly faster steps.
    checked = 0
    for rate in (2e6, 2.2e6):
        profile = replace(PROFILE, cpu_attention_keys_per_s=rate, gather_bytes_per_s=200e9)
        plan = make_plan(mixtral, BF16, profile, budget("12GiB", requests=256))
        same = [C(plan.max_batch_size, plan.micro_batch_size, plan.num_resident_experts,
                  plan.max_prefill_tokens, s, plan.ring_size) for s in (0.0, 0.125)]
        device, hybrid = (predict(costs, profile, c, 640).tokens_per_s for c in same)
        if device < hybrid < 1.05 * device:
            assert plan.cpu_attention_share == 0
            checked += 1
    assert checked  # the rates above do make a marginal host share


def test_longer_runs_of_experts_cost_the_host_less(mixtral: ModelSpec) -> None:
    """The dispatch term counts grouped products: a ring of 2 computes its streamed experts in
    runs of at most 2, a ring of 4 in runs of 4, a ring of 32 in runs of 16 (Mixtral: one run
    per layer), and the host's work drops with them; FP8
    runs are capped by their dequantisation workspace."""
    from moe_gen.cost_model import run_length

    costs = ModelCosts.of(mixtral, BF16)
    dispatch = [predict(costs, PROFILE, Candidate(256, 32, 16, 8192, ring=r), 640).dispatch_s
                for r in (2, 4, 32)]
    assert dispatch[0] > dispatch[1] > dispatch[2]
    assert [run_length(r) for r in (2, 16, 32, 64)] == [8, 8, 16, 32]
    # A Mixtral expert widened to bf16 (352 MB) alone exceeds the 256 MiB workspace: one a run.
    assert ModelCosts.of(mixtral, BF16, fp8_experts=True).fp8_run_cap == 1
    assert costs.fp8_run_cap > 1000


def test_the_device_gathers_the_kv_where_the_host_gather_is_slower(mixtral: ModelSpec) -> None:
    """A host gather slower than the link makes the device's own gather the plan (no staging in
    host memory); where the device cannot gather, or its gather is far slower, the host does."""
    from dataclasses import replace

    staged = make_plan(mixtral, BF16, PROFILE, budget("12GiB"))
    assert staged.kv_gather == "staged"  # the profile has no mapped rate
    mapped = make_plan(mixtral, BF16, replace(PROFILE, mapped_gather_bytes_per_s=45e9),
                       budget("12GiB"))
    assert mapped.kv_gather == "mapped"
    assert mapped.host_memory is not None and mapped.host_memory.staging == 0
    assert staged.host_memory is not None and staged.host_memory.staging > 0
    assert mapped.prediction is not None and staged.prediction is not None
    assert mapped.prediction.tokens_per_s > staged.prediction.tokens_per_s
    slow = make_plan(mixtral, BF16, replace(PROFILE, gather_bytes_per_s=200e9,
                                            mapped_gather_bytes_per_s=5e9), budget("12GiB"))
    assert slow.kv_gather == "staged"


def test_the_streaming_ring_computes_runs_as_long_as_the_planner_counts() -> None:
    from moe_core import load_model, tiny_model_path
    from moe_gen.cost_model import run_length
    from moe_gen.model_setup import install_streaming
    from moe_gen.plan import Plan

    plan = Plan(max_batch_size=2, micro_batch_size=2, max_prefill_tokens=16, page_tokens=4,
                num_kv_pages=8, num_resident_experts=3, ring_size=32)
    loaded = install_streaming(load_model(tiny_model_path(), dtype="float32"), plan, "cpu")
    assert loaded.runtime is not None and loaded.runtime.ring is not None
    assert loaded.runtime.ring.max_group == run_length(32) == 16
