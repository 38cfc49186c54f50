"""Local GPU detection from CUDA device properties (a fake object here), and no CUDA at import."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import pytest
from moe_cap import HardwareError, HardwareTable, detect_gpu
from moe_cap import detect as detect_module

GiB = 2**30


@dataclass(frozen=True)
class FakeProperties:
    name: str
    total_memory: int


@pytest.mark.parametrize(("name", "memory", "row"), [
    ("NVIDIA H200", 140 * GiB, "H200"),
    ("NVIDIA H100 80GB HBM3", 79 * GiB, "H100 SXM"),
    ("NVIDIA H100 PCIe", 79 * GiB, "H100 PCIe"),
    ("NVIDIA A100-SXM4-80GB", 79 * GiB, "A100 SXM 80GB"),
    ("NVIDIA A100-SXM4-40GB", 39 * GiB, "A100 SXM 40GB"),
    ("NVIDIA A100 80GB PCIe", 79 * GiB, "A100 PCIe 80GB"),
    ("NVIDIA A100-PCIE-40GB", 39 * GiB, "A100 PCIe 40GB"),
    ("NVIDIA GeForce RTX 4090", 23 * GiB, "RTX 4090"),
    ("NVIDIA GeForce RTX 3090", 23 * GiB, "RTX 3090"),
    ("NVIDIA RTX A6000", 47 * GiB, "RTX A6000"),
    ("NVIDIA L40S", 44 * GiB, "L40S"),
    ("NVIDIA B200", 178 * GiB, "B200"),
    ("AMD Instinct MI300X", 191 * GiB, "MI300X"),
])
def test_known_devices(name: str, memory: int, row: str, table: HardwareTable) -> None:
    assert detect_gpu(table, FakeProperties(name, memory)).name == row


@pytest.mark.parametrize("name", ["NVIDIA GeForce RTX 3090 Ti", "NVIDIA H200 NVL",
                                  "NVIDIA GeForce GTX 1080", "NVIDIA H100 NVL"])
def test_unknown_devices_name_the_override(name: str, table: HardwareTable) -> None:
    with pytest.raises(HardwareError) as info:
        detect_gpu(table, FakeProperties(name, 24 * GiB))
    assert name in str(info.value) and "MOE_CAP_HARDWARE" in str(info.value)


def test_no_cuda_device(table: HardwareTable, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(detect_module, "local_device_properties", lambda device=0: None)
    with pytest.raises(HardwareError, match=r"no CUDA GPU.*--gpu"):
        detect_gpu(table)


def test_local_device_is_read_through_torch(table: HardwareTable,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: FakeProperties("NVIDIA H200", 140 * GiB))
    assert detect_gpu(table).name == "H200"


def test_import_initialises_no_cuda() -> None:
    code = ("import moe_cap, moe_cap.cli, torch; "
            "print(torch.cuda.is_initialized(), 'pynvml' in __import__('sys').modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
