"""What a run record says about its host: the CPU in the hardware table's form, the memory,
energy where a counter measured it, and the experts each step used."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
from moe_core import load_model, tiny_model_path
from moe_gen.energy_meter import EnergyMeter
from moe_gen.expert_usage import ExpertUsage
from moe_gen.host_machine import cpu_model, cpu_table_name, host_memory_bytes


@pytest.mark.parametrize(("kernel", "table"), [
    ("AMD EPYC 9654 96-Core Processor", "EPYC 9654"),
    ("Intel(R) Xeon(R) Platinum 8480+", "Xeon Platinum 8480+"),
    ("Intel(R) Xeon(R) Platinum 8380 CPU @ 2.30GHz", "Xeon Platinum 8380"),
    ("AMD EPYC", "EPYC"),
])
def test_cpu_names_take_the_hardware_tables_form(kernel: str, table: str) -> None:
    assert cpu_table_name(kernel) == table


def test_cpu_and_memory_are_read_from_the_kernels_files() -> None:
    info = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9654 96-Core\n"
    assert cpu_model(info) == "AMD EPYC 9654 96-Core"
    assert host_memory_bytes("MemTotal:       16384 kB\nMemFree: 1 kB\n") == 16384 * 1024
    assert host_memory_bytes("nothing here") is None


def rapl(root: Path, values: list[tuple[int, int]]) -> None:
    for i, (energy, span) in enumerate(values):
        package = root / f"intel-rapl:{i}"
        (package / f"intel-rapl:{i}:0").mkdir(parents=True, exist_ok=True)  # a sub-domain
        (package / "energy_uj").write_text(f"{energy}\n")
        (package / "max_energy_range_uj").write_text(f"{span}\n")


def test_cpu_energy_sums_the_rapl_packages_across_a_wrap(tmp_path: Path) -> None:
    rapl(tmp_path, [(1_000_000, 10_000_000), (9_500_000, 10_000_000)])
    with EnergyMeter(None, tmp_path) as meter:
        rapl(tmp_path, [(3_000_000, 10_000_000), (500_000, 10_000_000)])  # package 1 wrapped
    assert meter.cpu_j == pytest.approx(2.0 + 1.0)
    assert meter.gpu_j is None  # no GPU asked for


def test_without_counters_nothing_is_measured(tmp_path: Path) -> None:
    with EnergyMeter(0, tmp_path / "absent") as meter:
        pass
    assert meter.cpu_j is None


def test_gpu_energy_comes_from_nvml_when_it_answers(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    readings = iter([5_000, 12_500])  # millijoules
    fake = types.ModuleType("pynvml")
    fake.nvmlInit = lambda: None  # type: ignore[attr-defined]
    fake.nvmlDeviceGetHandleByIndex = lambda i: f"gpu{i}"  # type: ignore[attr-defined]
    fake.nvmlDeviceGetTotalEnergyConsumption = lambda h: next(readings)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with EnergyMeter(0, tmp_path) as meter:
        pass
    assert meter.gpu_j == pytest.approx(7.5)


def test_expert_usage_counts_the_distinct_experts_of_each_layer() -> None:
    model = load_model(tiny_model_path(), dtype="float32")
    seen: dict[int, set[int]] = {}

    def record(layer: int, ids: torch.Tensor, weights: torch.Tensor) -> None:
        seen.setdefault(layer, set()).update(ids.flatten().tolist())

    blocks = model.moe_blocks()
    for block in blocks:
        block.observer = record  # an observer already there keeps being called
    with ExpertUsage(model) as usage, torch.no_grad():
        model(torch.tensor([[5, 6, 7, 8, 9, 10]]))
        counts = usage.take()
        assert usage.take() == tuple(0 for _ in blocks)  # taken: cleared
    assert counts == tuple(len(seen[b.layer]) for b in blocks)
    assert all(b.observer is record for b in blocks)  # restored
