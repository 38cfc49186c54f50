"""The device a command runs on, checked before anything is loaded onto it."""

from __future__ import annotations

import torch

from moe_core.errors import DeviceError

__all__ = ["check_device"]


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a torch device, once this machine is known to have it.

    The tools run on the CPU and on CUDA GPUs; asking for a GPU that is not there fails here,
    in one line, instead of deep inside torch after the model has been read.

    Raises:
        DeviceError: not a device name, not cpu or cuda, or no such GPU on this machine.
    """
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"device {str(device)!r}: not a device name (use cpu, cuda or "
                          "cuda:N)") from None
    if parsed.type == "cpu":
        return parsed
    if parsed.type != "cuda":
        raise DeviceError(f"device {str(device)!r}: the tools run on cpu or cuda")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise DeviceError(f"device {str(device)!r}: no CUDA GPU is available on this machine "
                          "(use --device cpu)")
    if parsed.index is not None and parsed.index >= count:
        raise DeviceError(f"device {str(device)!r}: this machine has {count} CUDA GPU(s), "
                          f"cuda:0 to cuda:{count - 1}")
    return parsed
