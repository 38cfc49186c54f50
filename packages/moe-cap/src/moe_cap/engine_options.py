"""How an in-process engine is loaded: `--engine NAME MODEL` plus device, dtype and budget."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from moe_core import SettingError, check_device, check_routing

from moe_cap.errors import TargetError

__all__ = ["ENGINES", "EngineOptions", "check_expert_dtype", "precision_name"]

ENGINES = ("moe-gen", "moe-infinity")
_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def precision_name(dtype: torch.dtype) -> str:
    """moe-cap's name of a torch dtype (`bf16`, `fp32`, ...)."""
    return _NAMES.get(dtype, str(dtype).removeprefix("torch."))


def check_expert_dtype(expert_dtype: str | None) -> None:
    """Refuse any experts' storage but the model dtype (None) and `fp8`.

    Raises:
        TargetError: naming `--expert-dtype`.
    """
    if expert_dtype not in (None, "fp8"):
        raise TargetError(f"--expert-dtype must be fp8 (or omitted: the model dtype), got "
                          f"{expert_dtype!r}")


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
        fetch: moe-infinity, offloaded: `copy` or `mapped` (moe-core's `load_offloaded`).
        lanes: moe-infinity, with `mapped`: 1 or 2 (the CPU computes a share of the misses).
        prefill: moe-infinity, offloaded: `admit` (prompts copy their misses into the cache) or
            `stream` (through a ring of staging slots, none admitted; moe-core's
            `load_offloaded`).
        expert_dtype: `"fp8"`: routed experts stored and streamed as e4m3 with per-output-
            channel scales (moe-infinity: offloaded, so with `expert_memory_bytes`; moe-gen:
            `JobConfig.expert_dtype`); recorded as the run record's `expert_dtype`. None: the
            model dtype.
        routing: Benchmark routing (`uniform`, `zipf:s=S,reuse=R`, `replay:TRACES`;
            `moe_core.routing_for`), or None: moe-infinity sets it for the engine's life,
            moe-gen for its job (`JobConfig.routing`, seeded by the run's seed).
    """

    engine: str
    model: str
    device: str = "cpu"
    dtype: str | None = None
    dummy: bool = False
    num_layers: int | None = None
    gpu_memory_bytes: int | None = None
    expert_memory_bytes: int | None = None
    fetch: str = "copy"
    lanes: int = 1
    prefill: str = "admit"
    expert_dtype: str | None = None
    routing: str | None = None

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise TargetError(f"--engine must be one of {', '.join(ENGINES)}, got "
                              f"{self.engine!r}")
        if self.device not in ("cpu", "cuda"):
            raise TargetError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.num_layers is not None and self.num_layers < 1:
            raise TargetError(f"--num-layers must be >= 1, got {self.num_layers}")
        if self.fetch not in ("copy", "mapped"):
            raise TargetError(f"--fetch must be copy or mapped, got {self.fetch!r}")
        if self.lanes not in (1, 2):
            raise TargetError(f"--lanes must be 1 or 2, got {self.lanes}")
        if (self.fetch != "copy" or self.lanes != 1) and self.engine != "moe-infinity":
            raise TargetError("--fetch and --lanes are for --engine moe-infinity")
        if self.fetch == "mapped" and self.expert_memory_bytes is None:
            raise TargetError("--fetch mapped needs --expert-memory (offloaded experts)")
        if self.lanes == 2 and self.fetch != "mapped":
            raise TargetError("--lanes 2 needs --fetch mapped")
        if self.prefill not in ("admit", "stream"):
            raise TargetError(f"--prefill must be admit or stream, got {self.prefill!r}")
        if self.prefill != "admit" and (self.engine != "moe-infinity"
                                        or self.expert_memory_bytes is None):
            raise TargetError("--prefill stream is for --engine moe-infinity with "
                              "--expert-memory (offloaded experts)")
        check_expert_dtype(self.expert_dtype)
        if (self.expert_dtype is not None and self.engine == "moe-infinity"
                and self.expert_memory_bytes is None):
            raise TargetError("--expert-dtype fp8 needs --expert-memory with --engine "
                              "moe-infinity (FP8 experts are offloaded ones)")
        if self.routing is not None:
            try:
                check_routing(self.routing)
            except SettingError as exc:
                raise TargetError(f"--{exc}") from None
        check_device(self.device)
