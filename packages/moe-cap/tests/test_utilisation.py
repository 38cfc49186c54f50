"""S-MBU, S-MFU and PCIe utilisation: linear in work, inverse in time, aggregated as ratios of
sums (never as the mean of per-step ratios)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st
from moe_cap import (
    HardwareError,
    HardwareTable,
    PeakRates,
    RunRecord,
    StepRecord,
    StepSample,
    decode_batch,
    prefill_batch,
    run_peaks,
    run_samples,
    step_cost,
    summarise,
    utilisation,
)
from moe_cap.utilisation import percentile
from moe_core import ModelSpec

PEAK = PeakRates(memory_bytes_per_s=4.8e12, flops_per_s=989.4e12, pcie_bytes_per_s=63e9)
positive = st.floats(1e-3, 1e12, allow_nan=False, allow_infinity=False)
factor = st.floats(0.01, 100)


@given(positive, positive, positive, st.floats(1e-6, 10), factor)
def test_linear_in_work_inverse_in_time(b: float, f: float, p: float, t: float,
                                        c: float) -> None:
    u = utilisation(b, f, t, PEAK, p)
    more = utilisation(b * c, f * c, t, PEAK, p * c)
    slower = utilisation(b, f, t * c, PEAK, p)
    for name in ("s_mbu", "s_mfu", "pcie"):
        assert getattr(more, name) == pytest.approx(getattr(u, name) * c, rel=1e-9)
        assert getattr(slower, name) == pytest.approx(getattr(u, name) / c, rel=1e-9)


samples = st.lists(st.builds(StepSample, phase=st.sampled_from(["prefill", "decode"]),
                             seconds=st.floats(1e-4, 10), bytes_moved=positive, flops=positive,
                             h2d_bytes=positive, num_tokens=st.integers(1, 10_000)),
                   min_size=1, max_size=30)


@given(samples)
def test_aggregate_is_the_ratio_of_sums(steps: list[StepSample]) -> None:
    s = summarise(steps, PEAK)["all"]
    seconds = sum(x.seconds for x in steps)
    assert s.aggregate.s_mbu == pytest.approx(
        sum(x.bytes_moved for x in steps) / seconds / PEAK.memory_bytes_per_s, rel=1e-9)
    assert s.aggregate.s_mfu == pytest.approx(
        sum(x.flops for x in steps) / seconds / PEAK.flops_per_s, rel=1e-9)
    # ... which is the time-weighted mean of the per-step values.
    weighted = sum(utilisation(x.bytes_moved, x.flops, x.seconds, PEAK).s_mbu * x.seconds
                   for x in steps) / seconds
    assert s.aggregate.s_mbu == pytest.approx(weighted, rel=1e-9)
    assert s.percentiles["p50"].s_mbu <= s.percentiles["p90"].s_mbu <= s.percentiles["p99"].s_mbu


def test_ratio_of_sums_differs_from_mean_of_ratios() -> None:
    # Nine fast steps at 80% bandwidth and one slow step at 8%: by time the run is mostly the
    # slow step. Ratio of sums: (9 * 0.8 * 1 + 0.08 * 10) / 19 = 0.421; mean of ratios: 0.728.
    bw = PEAK.memory_bytes_per_s
    steps = [StepSample("decode", 1.0, 0.8 * bw, 0, 0, 1)] * 9 + [
        StepSample("decode", 10.0, 0.08 * bw * 10, 0, 0, 1)]
    s = summarise(steps, PEAK)
    assert s["all"].aggregate.s_mbu == pytest.approx(8.0 / 19)
    assert s["decode"].aggregate.s_mbu == s["all"].aggregate.s_mbu
    assert "prefill" not in s
    assert s["all"].percentiles["p50"].s_mbu == pytest.approx(0.8)


def test_percentile_interpolates() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5], 99) == 5
    with pytest.raises(ValueError):
        percentile([], 50)


def test_run_samples_cost_every_step(mixtral: ModelSpec, table: HardwareTable) -> None:
    record = RunRecord(
        engine="test", model="mixtral-8x7b", weight_dtype="bf16", kv_dtype="bf16", gpu="H200",
        wall_seconds=1.0, input_tokens=512, output_tokens=2, num_layers=8,
        steps=(StepRecord("prefill", 0.25, prefill_batch(1, 512)),
               StepRecord("decode", 0.01, decode_batch(1, 512), h2d_bytes=10**9),
               StepRecord("decode", 0.01, decode_batch(1, 513), experts_activated=(2,) * 8)))
    got = run_samples(record, mixtral)
    eight = mixtral.truncated(8)
    assert got[0].flops == step_cost(eight, prefill_batch(1, 512)).flops
    assert got[1].bytes_moved == step_cost(eight, decode_batch(1, 512)).bytes
    assert got[1].h2d_bytes == 10**9
    peak = PeakRates.of(table.gpu("H200"), "bf16")
    s = summarise(got, peak)
    assert s["decode"].aggregate.pcie == pytest.approx(10**9 / 0.02 / 63e9)
    assert s["decode"].num_tokens == 2 and s["all"].num_steps == 3


def test_peaks_from_the_table(table: HardwareTable) -> None:
    h200 = table.gpu("H200")
    assert PeakRates.of(h200, "bf16").flops_per_s == 989.4e12
    measured = PeakRates.of(h200, "bf16", "measured", num_gpus=2)
    assert measured.flops_per_s == 2 * 796e12
    assert measured.pcie_bytes_per_s == 2 * 54.7e9
    assert PeakRates.of(h200, "fp8", "measured").flops_per_s == 1978.9e12  # none measured


# --- Runs on the CPU alone ---------------------------------------------------------------------


def cpu_record() -> RunRecord:
    """Two steps of a fp32 run on the CPU alone (`gpu: none`) on an EPYC 9654."""
    return RunRecord(engine="test", model="mixtral-8x7b", weight_dtype="fp32", kv_dtype="fp32",
                     gpu="none", cpu="EPYC 9654", wall_seconds=2.0, input_tokens=512,
                     output_tokens=1, num_layers=2,
                     steps=(StepRecord("prefill", 1.0, prefill_batch(1, 512)),
                            StepRecord("decode", 0.5, decode_batch(1, 512), h2d_bytes=10**6)))


def test_a_cpu_run_is_divided_by_its_cpus_rates(mixtral: ModelSpec, table: HardwareTable) -> None:
    name, peak = run_peaks(cpu_record(), table)
    epyc = table.cpu("EPYC 9654")
    assert name == "EPYC 9654" and peak.pcie_bytes_per_s is None
    assert peak.memory_bytes_per_s == 460.8e9 and peak.flops_per_s == 7.37e12
    samples = run_samples(cpu_record(), mixtral)
    s = summarise(samples, peak)["decode"]
    assert s.aggregate.s_mbu == pytest.approx(samples[1].bytes_moved / 0.5 / 460.8e9)
    assert s.aggregate.s_mfu == pytest.approx(samples[1].flops / 0.5 / epyc.peak_flops("fp32"))
    assert s.aggregate.pcie is None and s.percentiles["p50"].pcie is None


def test_cpu_and_gpu_overrides(table: HardwareTable) -> None:
    assert run_peaks(cpu_record(), table, cpu="Xeon Platinum 8480+")[1].flops_per_s == 7.17e12
    name, peak = run_peaks(cpu_record(), table, gpu="H200")
    assert name == "H200" and peak.pcie_bytes_per_s == 63e9
    gpu_run = dataclasses.replace(cpu_record(), gpu="H200")
    assert run_peaks(gpu_run, table, gpu="none")[0] == "EPYC 9654"


def test_a_cpu_run_needs_a_cpu_with_that_rate(table: HardwareTable) -> None:
    with pytest.raises(HardwareError, match=r"names no host CPU.*--cpu NAME"):
        run_peaks(dataclasses.replace(cpu_record(), cpu=None), table)
    with pytest.raises(HardwareError, match=r"EPYC 9654 has no bf16 matrix rate.*lists fp32"):
        run_peaks(dataclasses.replace(cpu_record(), weight_dtype="bf16"), table)
