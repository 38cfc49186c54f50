"""NVML energy: measured through a fake `pynvml`, and `None` where NVML is missing or unable."""

from __future__ import annotations

import sys
import types

import pytest
from moe_cap import NvmlEnergyMeter


class FakeNvml(types.ModuleType):
    """The few `pynvml` calls the meter makes; each read advances the counter by 1,500 mJ."""

    class NVMLError(Exception):
        pass

    def __init__(self, supported: bool = True) -> None:
        super().__init__("pynvml")
        self.supported, self.reads, self.shutdowns = supported, 0, 0

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: int) -> int:
        if not self.supported:
            raise self.NVMLError("not supported")
        self.reads += 1
        return 1_000_000 + 1_500 * self.reads + 10**6 * handle


def test_measures_joules(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with NvmlEnergyMeter(devices=(0, 1)) as meter:
        pass
    # Two GPUs read twice each: reads 1, 2 at start and 3, 4 at the end -> 2 x 3,000 mJ.
    assert meter.joules == pytest.approx(6.0)
    assert fake.shutdowns == 1


def test_unsupported_counter_gives_none(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNvml(supported=False)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with NvmlEnergyMeter() as meter:
        pass
    assert meter.joules is None and fake.shutdowns == 1


def test_without_pynvml_gives_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import raises ImportError
    with NvmlEnergyMeter() as meter:
        pass
    assert meter.joules is None
