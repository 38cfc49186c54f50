"""The hardware table: complete rows with sources, dense peaks, overrides by YAML, and unknown
hardware reported with the override to set."""

from __future__ import annotations

from pathlib import Path

import pytest
from moe_cap import HardwareError, HardwareTable, load_hardware_table

REQUIRED_GPUS = ("RTX 3090", "RTX 4090", "RTX 5090", "RTX A5000", "RTX A6000", "L40S",
                 "A100 PCIe 40GB", "A100 PCIe 80GB", "A100 SXM 40GB", "A100 SXM 80GB",
                 "H100 PCIe", "H100 SXM", "H200", "B200", "MI300X")


def test_every_issue_gpu_is_there_with_sources(table: HardwareTable) -> None:
    for name in REQUIRED_GPUS:
        g = table.gpu(name)
        assert g.source and g.price_source and g.price_usd > 0 and g.tdp_w > 0
        assert {"fp32", "bf16", "fp16", "int8"} <= set(g.peak_flops_per_s)
        assert g.peak_flops_per_s["bf16"] >= g.peak_flops_per_s["fp32"]
    assert len(table.cpus) >= 4 and all(c.source for c in table.cpus)
    assert all(d.source for d in table.dram)


def test_peaks_are_dense_not_sparse(table: HardwareTable) -> None:
    # The datasheets headline 2:4 sparse rates (H100 SXM "1,979 TFLOPS" bf16); dense is half.
    assert table.gpu("H100 SXM").peak_flops("bf16") == 989.4e12
    assert table.gpu("B200").peak_flops("fp4") == 9000e12
    assert table.gpu("MI300X").peak_flops("fp16") == 1307.4e12
    # GeForce cards accumulate in FP32 at half rate: the 4090's bf16 is 165.2, not 330.
    assert table.gpu("RTX 4090").peak_flops("bf16") == 165.2e12


def test_units_and_links(table: HardwareTable) -> None:
    h200 = table.gpu("h200")  # names ignore case, spaces and dashes
    assert h200.memory_bytes == 141 * 10**9
    assert h200.memory_bandwidth_bytes_per_s == 4.8e12
    assert h200.pcie_gen == 5 and h200.pcie_bytes_per_s == 63e9
    assert table.gpu("a100-sxm-80gb").name == "A100 SXM 80GB"


def test_measured_values_stay_apart(table: HardwareTable) -> None:
    h200 = table.gpu("H200")
    assert h200.measured is not None and "DESIGN.md" in h200.measured.source
    assert h200.pcie_bandwidth("measured") == 54.7e9
    assert h200.pcie_bandwidth() == 63e9
    assert h200.memory_bandwidth("measured") == 4.27e12
    assert h200.peak_flops("bf16", "measured") == 796e12
    assert table.gpu("H100 SXM").peak_flops("bf16", "measured") == 989.4e12  # falls back


def test_missing_precision_is_an_error(table: HardwareTable) -> None:
    with pytest.raises(HardwareError, match=r"no fp4 matrix rate.*MOE_CAP_HARDWARE"):
        table.gpu("H200").peak_flops("fp4")


def test_unknown_gpu_lists_known_and_names_override(table: HardwareTable) -> None:
    with pytest.raises(HardwareError) as info:
        table.gpu("GTX 1080")
    message = str(info.value)
    assert "'GTX 1080'" in message and "H200" in message
    assert "--hardware-file" in message and "MOE_CAP_HARDWARE" in message


def test_yaml_override_merges_and_adds(tmp_path: Path) -> None:
    path = tmp_path / "hw.yaml"
    path.write_text("""
gpus:
  - name: H200
    price_usd: 25000
    peak_tflops: {fp4: 1.0}
  - name: GTX 1080
    vendor: NVIDIA
    device_names: ['gtx 1080']
    memory_gb: 8
    memory_bandwidth_gb_per_s: 320
    pcie_gen: 3
    tdp_w: 180
    peak_tflops: {fp32: 8.9}
    source: my measurements
    price_usd: 100
    price_source: second hand
cpus:
  - name: EPYC 9654
    price_usd: 5000
""")
    table = load_hardware_table(path)
    assert table.gpu("H200").price_usd == 25000
    assert table.gpu("H200").peak_flops("bf16") == 989.4e12  # untouched fields stay
    assert table.gpu("H200").peak_flops("fp4") == 1e12  # nested tables merge
    assert table.gpu("GTX 1080").pcie_bytes_per_s == 15.75e9
    assert table.cpu("EPYC 9654").price_usd == 5000
    assert table.sources[-1] == str(path)


def test_environment_variable_names_the_override(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "hw.yaml"
    path.write_text("gpus: [{name: H200, price_usd: 1}]\n")
    monkeypatch.setenv("MOE_CAP_HARDWARE", str(path))
    assert load_hardware_table().gpu("H200").price_usd == 1


@pytest.mark.parametrize(("text", "expected"), [
    ("gpus: [{name: New GPU, vendor: X}]", "gpu 'New GPU': missing field 'pcie_gen'"),
    ("gpus: [{name: H200, tdp_w: lots}]", "gpu 'H200'.tdp_w: not a number"),
    ("gpus: [{name: H200, peak_tflops: {fp7: 1}}]", "unknown precision 'fp7'"),
    ("gpus: [{name: H200, pcie_gen: 9}]", "no bandwidth for PCIe gen 9"),
    ("tpus: []", "unknown section(s) ['tpus']"),
    ("gpus: {name: H200}", "gpus must be a list of mappings"),
    ("gpus: [unclosed", "not valid YAML"),
])
def test_bad_overrides_name_file_and_field(text: str, expected: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(HardwareError) as info:
        load_hardware_table(path)
    assert expected in str(info.value) and str(path) in str(info.value)


def test_missing_override_file(tmp_path: Path) -> None:
    with pytest.raises(HardwareError, match="does not exist"):
        load_hardware_table(tmp_path / "nope.yaml")


@pytest.mark.parametrize(("name", "cores", "ghz", "flop_per_cycle"), [
    ("Xeon Platinum 8380", 40, 2.30, 64), ("Xeon Platinum 8480+", 56, 2.00, 64),
    ("Xeon Platinum 8592+", 64, 1.90, 64), ("EPYC 7763", 64, 2.45, 32),
    ("EPYC 9554", 64, 3.10, 32), ("EPYC 9654", 96, 2.40, 32),
])
def test_cpu_fp32_peaks_are_cores_times_base_clock_times_flop_per_cycle(
        table: HardwareTable, name: str, cores: int, ghz: float, flop_per_cycle: int) -> None:
    cpu = table.cpu(name)
    assert cpu.cores == cores
    assert cpu.peak_flops("fp32") == pytest.approx(cores * ghz * 1e9 * flop_per_cycle, rel=5e-3)
    assert f"{cores} cores x {ghz:.2f} GHz base x {flop_per_cycle} FLOP/cycle" in \
        cpu.source.replace("\n", " ")


def test_a_cpu_peak_can_be_added_by_override(tmp_path: Path) -> None:
    extra = tmp_path / "hw.yaml"
    extra.write_text("cpus:\n  - {name: EPYC 9654, peak_tflops: {bf16: 14.7}}\n")
    cpu = load_hardware_table(extra).cpu("EPYC 9654")
    assert cpu.peak_flops("bf16") == 14.7e12 and cpu.peak_flops("fp32") == 7.37e12
    with pytest.raises(HardwareError, match="EPYC 9654 has no fp8 matrix rate"):
        cpu.peak_flops("fp8")
