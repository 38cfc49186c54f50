"""GPU energy measured by NVML's total-energy counter (Volta and later), when `pynvml` is present.

`pynvml` (the `nvidia-ml-py` distribution, moe-cap's `nvml` extra) is imported only when a meter
starts. Where it is missing, or the driver does not support the counter, the meter reports
`None` and the cost model falls back to TDP x load, saying so.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType, TracebackType

__all__ = ["NvmlEnergyMeter", "nvml_module"]


def nvml_module() -> ModuleType | None:
    """The `pynvml` module, or None where it is not installed."""
    try:
        return importlib.import_module("pynvml")
    except ImportError:
        return None


class NvmlEnergyMeter:
    """Joules the given GPUs used while the `with` block ran.

    ```python
    with NvmlEnergyMeter() as meter:
        run_benchmark()
    record_energy = meter.joules  # None where NVML could not measure
    ```
    """

    def __init__(self, devices: Sequence[int] = (0,)) -> None:
        """Measure the GPUs of NVML indices `devices`."""
        self.devices = tuple(devices)
        self.joules: float | None = None
        self._nvml: ModuleType | None = None
        self._handles: list[object] = []
        self._start_mj: list[int] = []

    def _read_mj(self) -> list[int]:
        assert self._nvml is not None
        return [int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(h)) for h in self._handles]

    def __enter__(self) -> NvmlEnergyMeter:
        nvml = nvml_module()
        if nvml is None:
            return self
        try:
            nvml.nvmlInit()
        except nvml.NVMLError:
            return self
        try:
            self._nvml = nvml
            self._handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in self.devices]
            self._start_mj = self._read_mj()
        except nvml.NVMLError:  # no such device, or no energy counter on this GPU
            self._nvml = None
            nvml.nvmlShutdown()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        nvml = self._nvml
        if nvml is None:
            return
        try:
            end_mj = self._read_mj()
            self.joules = sum(e - s for e, s in zip(end_mj, self._start_mj, strict=True)) / 1e3
        except nvml.NVMLError:
            self.joules = None
        finally:
            nvml.nvmlShutdown()
            self._nvml = None
