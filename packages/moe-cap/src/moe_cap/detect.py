"""Which GPU is this? Match the CUDA device's name and memory against the hardware table.

torch is imported only when a caller asks for the local device, never at import time, so importing
moe-cap starts no CUDA context. Tests pass a fake properties object instead.
"""

from __future__ import annotations

import re
from typing import Protocol

from moe_cap.errors import HardwareError
from moe_cap.hardware import OVERRIDE_HINT, GpuSpec, HardwareTable

__all__ = ["DeviceProperties", "detect_gpu", "local_device_properties"]


class DeviceProperties(Protocol):
    """What detection reads from `torch.cuda.get_device_properties`."""

    @property
    def name(self) -> str:
        """The device name (`"NVIDIA H200"`, `"NVIDIA A100-SXM4-80GB"`)."""
        ...

    @property
    def total_memory(self) -> int:
        """Device memory in bytes."""
        ...


def local_device_properties(device: int = 0) -> DeviceProperties | None:
    """The properties of CUDA device `device`, or None where torch sees no CUDA device."""
    import torch

    if not torch.cuda.is_available() or device >= torch.cuda.device_count():
        return None
    return torch.cuda.get_device_properties(device)


def detect_gpu(table: HardwareTable, properties: DeviceProperties | None = None,
               device: int = 0) -> GpuSpec:
    """The table row of a GPU: `properties` if given, else the local CUDA device `device`.

    A row matches when one of its `device_names` patterns is found in the lower-cased device
    name; among several (A100 40GB and 80GB share a name pattern) the closest memory size wins.

    Raises:
        HardwareError: no CUDA device, or one the table does not know (the message names the
            device and the override to set).
    """
    if properties is None:
        properties = local_device_properties(device)
        if properties is None:
            raise HardwareError("no CUDA GPU is visible here; name one with --gpu "
                                "(`moe-cap hardware` lists them)")
    name = properties.name.lower()
    matches = [g for g in table.gpus if any(re.search(p, name) for p in g.device_names)]
    if not matches:
        gib = properties.total_memory / 2**30
        raise HardwareError(f"GPU {properties.name!r} ({gib:.0f} GiB) is not in the hardware "
                            f"table; {OVERRIDE_HINT}")
    return min(matches, key=lambda g: abs(g.memory_bytes - properties.total_memory))
