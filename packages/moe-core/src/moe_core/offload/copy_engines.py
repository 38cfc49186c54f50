"""Choosing a copy engine for a device: the CPU one for CPU, the CuPy one for CUDA."""

from __future__ import annotations

import torch

from moe_core.offload.copy_engine import CopyEngine, CpuCopyEngine

__all__ = ["make_copy_engine"]


def make_copy_engine(device: str | torch.device, prefetch_window: int = 2) -> CopyEngine:
    """The copy engine for copies into `device`.

    Args:
        device: `"cpu"` gives a `CpuCopyEngine`; a CUDA device gives a `CudaCopyEngine`
            (CuPy is imported only then).
        prefetch_window: Prefetches on the CUDA prefetch stream at once.

    Raises:
        ValueError: a device type with no copy engine.
        RuntimeError: CUDA asked for but CuPy missing.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return CpuCopyEngine()
    if device.type == "cuda":
        from moe_core.offload.cuda_copy_engine import CudaCopyEngine

        return CudaCopyEngine(device, prefetch_window=prefetch_window)
    raise ValueError(f"no copy engine for device type {device.type!r} (use cpu or cuda)")
