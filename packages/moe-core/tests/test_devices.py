"""The device a command asks for is checked before anything is loaded: a missing GPU or a
device name torch does not know is one clear error, not a driver traceback."""

from __future__ import annotations

import pytest
import torch
from moe_core import DeviceError, check_device

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0


def test_the_cpu_is_always_there() -> None:
    assert check_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize(("device", "message"), [
    ("cuda" if GPUS == 0 else f"cuda:{GPUS}",
     "no CUDA GPU is available" if GPUS == 0 else f"has {GPUS} CUDA GPU"),
    (f"cuda:{GPUS + 3}", "no CUDA GPU is available" if GPUS == 0 else f"has {GPUS} CUDA GPU"),
    ("gpu", "not a device name"),
    ("meta", "run on cpu or cuda"),
])
def test_devices_this_machine_lacks_are_refused(device: str, message: str) -> None:
    with pytest.raises(DeviceError, match=message):
        check_device(device)
