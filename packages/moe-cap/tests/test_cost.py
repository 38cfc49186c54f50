"""The cost model, worked by hand: purchases amortised, energy measured or estimated, the host
included, and the split between input and output tokens."""

from __future__ import annotations

import dataclasses

import pytest
from moe_cap import (
    CostConfig,
    HardwareError,
    HardwareTable,
    MoECapError,
    RunRecord,
    StepRecord,
    decode_batch,
    prefill_batch,
    price_run,
)


def record(**changes: object) -> RunRecord:
    """100 s of wall time: 20 s of prefill, 60 s of decode, 20 s between steps."""
    base = RunRecord(
        engine="moe-gen 0.1.0", model="mixtral-8x7b", weight_dtype="bf16", kv_dtype="bf16",
        gpu="H200", wall_seconds=100.0, input_tokens=100_000, output_tokens=20_000,
        steps=(StepRecord("prefill", 20.0, prefill_batch(200, 500)),
               StepRecord("decode", 60.0, decode_batch(200, 500))),
        cpu="EPYC 9654", dram_gib=128.0, gpu_energy_j=50_000.0)
    return dataclasses.replace(base, **changes)


def test_owned_machine_by_hand(table: HardwareTable) -> None:
    config = CostConfig(years=3, utilisation=1.0, usd_per_kwh=0.15, cpu_load=0.5)
    r = price_run(record(), table, config)
    life_h = 3 * 8760  # 26,280 hours
    # Purchases: H200 $30,000, EPYC 9654 $11,805, 128 GiB x $5 = $640, over 26,280 h.
    assert r.usd_per_hour_parts["gpu"] == pytest.approx(30_000 / life_h)  # 1.14155
    assert r.usd_per_hour_parts["cpu"] == pytest.approx(11_805 / life_h)  # 0.44920
    assert r.usd_per_hour_parts["dram"] == pytest.approx(640 / life_h)  # 0.02435
    # Energy: GPU measured 50,000 J; CPU 360 W x 0.5 x 100 s = 18,000 J; DRAM 128 GiB x
    # 0.3 W x 100 s = 3,840 J. 71,840 J / 100 s = 718.4 W -> 0.7184 kW x $0.15 = $0.10776/h.
    assert r.energy["gpu"].joules == 50_000 and r.energy["gpu"].measured
    assert r.energy["cpu"].joules == pytest.approx(18_000) and not r.energy["cpu"].measured
    assert r.energy["dram"].joules == pytest.approx(3_840)
    assert r.usd_per_hour_parts["energy"] == pytest.approx(0.10776)
    assert r.usd_per_hour == pytest.approx(1.722867, rel=1e-6)
    assert r.run_usd == pytest.approx(1.722867 * 100 / 3600, rel=1e-6)  # $0.0478574
    # Prefill took 20 of the 80 step seconds: 25% of cost and energy goes to input tokens.
    assert r.prefill_share == 0.25
    assert r.usd_per_million_input_tokens == pytest.approx(0.0478574 * 0.25 / 0.1, rel=1e-5)
    assert r.usd_per_million_output_tokens == pytest.approx(0.0478574 * 0.75 / 0.02, rel=1e-5)
    assert r.usd_per_million_tokens == pytest.approx(0.0478574 / 0.12, rel=1e-5)
    assert r.joules_per_token == pytest.approx(71_840 / 120_000)
    assert r.joules_per_input_token == pytest.approx(71_840 * 0.25 / 100_000)
    assert r.joules_per_output_token == pytest.approx(71_840 * 0.75 / 20_000)
    assert any("CPU energy estimated" in n for n in r.notes)


def test_utilisation_and_years_divide_the_purchase(table: HardwareTable) -> None:
    full = price_run(record(), table, CostConfig())
    half = price_run(record(), table, CostConfig(utilisation=0.5))
    longer = price_run(record(), table, CostConfig(years=6))
    assert half.usd_per_hour_parts["gpu"] == pytest.approx(2 * full.usd_per_hour_parts["gpu"])
    assert longer.usd_per_hour_parts["cpu"] == pytest.approx(full.usd_per_hour_parts["cpu"] / 2)
    assert half.usd_per_hour_parts["energy"] == full.usd_per_hour_parts["energy"]


def test_tdp_fallback_and_pue(table: HardwareTable) -> None:
    r = price_run(record(gpu_energy_j=None, num_gpus=2), table,
                  CostConfig(gpu_load=0.8, pue=1.5))
    assert r.energy["gpu"].joules == pytest.approx(2 * 700 * 0.8 * 100)  # 112,000 J
    assert not r.energy["gpu"].measured
    watts = (112_000 + 360 * 100 + 38.4 * 100) / 100
    assert r.usd_per_hour_parts["energy"] == pytest.approx(watts * 1.5 / 1000 * 0.15)
    assert r.usd_per_hour_parts["gpu"] == pytest.approx(2 * 30_000 / 26_280)


def test_cloud_rate_replaces_purchase_and_energy(table: HardwareTable) -> None:
    r = price_run(record(), table, CostConfig(cloud_usd_per_hour=3.6))
    assert r.usd_per_hour_parts == {"cloud": 3.6}
    assert r.run_usd == pytest.approx(0.1)  # 100 s at $3.60/h
    assert r.usd_per_million_tokens == pytest.approx(0.1 / 0.12)
    assert r.joules_per_token > 0


def test_host_is_required_or_explicitly_left_out(table: HardwareTable) -> None:
    with pytest.raises(HardwareError, match=r"--cpu NAME.*--no-host"):
        price_run(record(cpu=None), table)
    with pytest.raises(HardwareError, match="--dram-gib"):
        price_run(record(dram_gib=None), table)
    gpu_only = price_run(record(cpu=None, dram_gib=None), table, CostConfig(include_host=False))
    assert set(gpu_only.usd_per_hour_parts) == {"gpu", "energy"}
    assert set(gpu_only.energy) == {"gpu"}
    named = price_run(record(cpu=None), table, CostConfig(cpu="Xeon Platinum 8480+"))
    assert named.usd_per_hour_parts["cpu"] == pytest.approx(10_710 / 26_280)


def test_unknown_hardware_names_the_override(table: HardwareTable) -> None:
    with pytest.raises(HardwareError, match="MOE_CAP_HARDWARE"):
        price_run(record(gpu="H300"), table)
    with pytest.raises(HardwareError, match="unknown CPU"):
        price_run(record(cpu="Pentium 4"), table)


def test_a_run_without_decode_has_no_output_price(table: HardwareTable) -> None:
    r = price_run(record(output_tokens=0, steps=(StepRecord("prefill", 1.0,
                                                            prefill_batch(1, 8)),)), table)
    assert r.usd_per_million_output_tokens is None and r.joules_per_output_token is None
    assert r.usd_per_million_input_tokens == pytest.approx(r.usd_per_million_tokens)


def test_config_validation_names_the_field() -> None:
    """In the user's words: the field, not the class (`CostConfig.years`)."""
    for field, value in (("years", 0), ("utilisation", 1.5), ("pue", 0.9), ("gpu_load", -1)):
        with pytest.raises(MoECapError, match=f"^{field} must be"):
            CostConfig(**{field: value})


# --- Runs on the CPU alone ---------------------------------------------------------------------


def test_a_cpu_run_is_charged_its_host_alone(table: HardwareTable) -> None:
    r = price_run(record(gpu="none", gpu_energy_j=None), table, CostConfig(cpu_load=0.5))
    life_h = 3 * 8760
    assert set(r.usd_per_hour_parts) == {"cpu", "dram", "energy"}
    assert r.usd_per_hour_parts["cpu"] == pytest.approx(11_805 / life_h)
    # Energy: CPU 360 W x 0.5 x 100 s = 18,000 J; DRAM 128 GiB x 0.3 W x 100 s = 3,840 J.
    assert set(r.energy) == {"cpu", "dram"}
    assert r.joules_per_token == pytest.approx(21_840 / 120_000)
    assert any("no GPU" in n for n in r.notes)


@pytest.mark.parametrize("name", ["none", "None", "none (CPU run)", " NONE "])
def test_every_spelling_of_no_gpu_is_a_cpu_run(table: HardwareTable, name: str) -> None:
    assert price_run(record(gpu=name), table).usd_per_hour_parts.keys() == {"cpu", "dram",
                                                                            "energy"}


def test_the_gpu_option_overrides_the_record(table: HardwareTable) -> None:
    as_recorded = price_run(record(gpu="A100 SXM 80GB"), table)
    as_h200 = price_run(record(gpu="A100 SXM 80GB"), table, CostConfig(gpu="H200"))
    assert as_recorded.usd_per_hour_parts["gpu"] == pytest.approx(15_000 / (3 * 8760))
    assert as_h200.usd_per_hour_parts == price_run(record(), table).usd_per_hour_parts
    cpu_only = price_run(record(), table, CostConfig(gpu="none"))
    assert "gpu" not in cpu_only.usd_per_hour_parts and "gpu" not in cpu_only.energy


def test_a_cpu_run_without_its_host_has_nothing_to_price(table: HardwareTable) -> None:
    with pytest.raises(HardwareError, match="no GPU, so --no-host leaves nothing to price"):
        price_run(record(gpu="none"), table, CostConfig(include_host=False))
