"""Energy a run used, where the machine measures it: the GPU's through NVML's total-energy
counter (Volta and later; the `pynvml` module of the `nvidia-ml-py` distribution, when it is
installed), the CPU packages' through Linux's RAPL powercap counters (when readable).

Where a counter is missing the figure stays None and the run record leaves the field out, so
moe-cap falls back to TDP x load and says so in its report: never a made-up measurement.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType, TracebackType

__all__ = ["EnergyMeter"]

_RAPL = Path("/sys/class/powercap")


class EnergyMeter:
    """Joules the GPU (`gpu_j`) and the CPU packages (`cpu_j`) used inside the `with` block.

    Attributes:
        gpu_j: NVML-measured GPU energy, or None.
        cpu_j: RAPL-measured CPU package energy, or None.
    """

    def __init__(self, gpu_index: int | None = 0, rapl_root: Path = _RAPL) -> None:
        """Measure GPU `gpu_index` (None: no GPU) and the RAPL packages under `rapl_root`."""
        self.gpu_index = gpu_index
        self.rapl_root = rapl_root
        self.gpu_j: float | None = None
        self.cpu_j: float | None = None
        self._nvml: ModuleType | None = None
        self._handle: object = None
        self._gpu_start_mj = 0
        self._packages: list[tuple[Path, int, int]] = []  # (counter, start uJ, range uJ)

    def __enter__(self) -> EnergyMeter:
        self._start_gpu()
        self._start_cpu()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self._nvml is not None:
            try:
                end = int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))
                self.gpu_j = (end - self._gpu_start_mj) / 1e3
            except Exception:  # the driver stopped answering: no figure rather than a wrong one
                self.gpu_j = None
        if self._packages:
            total = 0
            for counter, start, span in self._packages:
                now = _read_int(counter)
                if now is None:
                    return
                total += (now - start) % span if span else now - start  # the counter wraps
            self.cpu_j = total / 1e6

    def _start_gpu(self) -> None:
        if self.gpu_index is None:
            return
        try:
            nvml = importlib.import_module("pynvml")
        except ImportError:
            return
        try:
            nvml.nvmlInit()
            self._handle = nvml.nvmlDeviceGetHandleByIndex(self.gpu_index)
            self._gpu_start_mj = int(nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))
            self._nvml = nvml
        except Exception:  # no driver, no such GPU, or no energy counter on it
            self._nvml = None

    def _start_cpu(self) -> None:
        packages = sorted(self.rapl_root.glob("intel-rapl:[0-9]*")) if self.rapl_root.is_dir() \
            else []
        for package in packages:
            if package.name.count(":") != 1:  # a sub-domain (core, uncore, dram) of a package
                continue
            start = _read_int(package / "energy_uj")
            span = _read_int(package / "max_energy_range_uj") or 0
            if start is None:
                self._packages = []
                return
            self._packages.append((package / "energy_uj", start, span))


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None
