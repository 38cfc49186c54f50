"""How an in-process engine is loaded: `--engine NAME MODEL` plus device, dtype and budget."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from moe_core import check_device

from moe_cap.errors import TargetError

__all__ = ["ENGINES", "EngineOptions", "precision_name"]

ENGINES = ("moe-gen", "moe-infinity")
_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def precision_name(dtype: torch.dtype) -> str:
    """moe-cap's name of a torch dtype (`bf16`, `fp32`, ...)."""
    return _NAMES.get(dtype, str(dtype).removeprefix("torch."))


@dataclass(frozen=True, kw_only=True)
class EngineOptions:
    """An in-process engine and its model.

    Attributes:
        engine: `"moe-gen"` (offline, whole workload at once) or `"moe-infinity"` (streaming,
            one request at a time).
        model: Checkpoint folder, hub id, known shape (with `dummy`) or `tiny-moe`.
        device: `"cpu"` or `"cuda"`.
        dtype: Model dtype (None: moe-core's rule, float32 on the CPU).
        dummy: Random weights of the model's shapes.
        num_layers: Keep the first N decoder layers.
        gpu_memory_bytes: moe-gen: the process's GPU memory budget (None: its default).
        expert_memory_bytes: moe-infinity: GPU memory for expert slots (None: every expert on
            the device, no offloading).
    """

    engine: str
    model: str
    device: str = "cpu"
    dtype: str | None = None
    dummy: bool = False
    num_layers: int | None = None
    gpu_memory_bytes: int | None = None
    expert_memory_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise TargetError(f"--engine must be one of {', '.join(ENGINES)}, got "
                              f"{self.engine!r}")
        if self.device not in ("cpu", "cuda"):
            raise TargetError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.num_layers is not None and self.num_layers < 1:
            raise TargetError(f"--num-layers must be >= 1, got {self.num_layers}")
        check_device(self.device)
