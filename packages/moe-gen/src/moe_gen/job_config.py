"""What a job is asked to do: the requests file, the output, the model and its budgets, and, for a
job on Ray, how many engines it spreads over."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from moe_core import (
    ModelSpec,
    SettingError,
    Truncate,
    check_device,
    check_routing,
    run_dtype,
)

from moe_gen.api import Defaults
from moe_gen.plan import Plan

__all__ = ["JobConfig", "RayConfig", "sample_input"]


def sample_input() -> Path:
    """The embedded sample prompts (the default `--input`)."""
    return Path(str(resources.files("moe_gen") / "data" / "sample_prompts.jsonl"))


@dataclass(frozen=True, kw_only=True)
class RayConfig:
    """A job run as a Ray Data pipeline: one engine actor per GPU (docs/moe-gen.md, "On Ray").

    Attributes:
        address: The cluster to join (`ray.init`'s address: `"auto"`, `"HOST:6379"`,
            `"ray://HOST:10001"`); None: the one `RAY_ADDRESS` names, else a new local cluster
            (on this machine) for the job's lifetime.
        num_engines: Engine actors (None: one per GPU of the cluster with `device="cuda"`, one
            on the CPU). Each has its own slots, copy engine and `host_memory_bytes /
            num_engines` of host memory.
        requests_per_batch: Requests an engine takes at a time (None: four full batches of the
            plan, and no more than an even share of the job, so every engine has work). An
            engine runs its batch to the end before it takes the next; its results reach the
            output as the batch ends.
    """

    address: str | None = None
    num_engines: int | None = None
    requests_per_batch: int | None = None

    def __post_init__(self) -> None:
        """Raises `SettingError` naming the option at fault."""
        if self.num_engines is not None and self.num_engines < 1:
            raise SettingError(f"--ray-engines must be at least 1, got {self.num_engines}")
        if self.requests_per_batch is not None and self.requests_per_batch < 1:
            raise SettingError(f"requests_per_batch must be at least 1, got "
                               f"{self.requests_per_batch}")


@dataclass(frozen=True, kw_only=True)
class JobConfig:
    """Everything a job needs.

    Attributes:
        model: Checkpoint folder, hub id, known shape (with `dummy`) or `tiny-moe`.
        input: Requests file (JSONL or plain text; default: the embedded sample).
        output: Results JSONL (appended; finished ids are skipped).
        defaults: Generation settings requests may override.
        gpu_memory_bytes: Device memory budget of the whole process (of each engine on Ray).
        host_memory_bytes: Host memory budget (expert store and KV pages; on Ray, shared
            evenly by the engines).
        device: `"cuda"` or `"cpu"`.
        dtype: Model dtype (default: moe-core's rule, `moe_core.run_dtype`: float32 on the CPU,
            else the checkpoint's).
        dummy: Random weights of the model's shapes.
        num_layers: Keep the first N decoder layers.
        eos: Stop at EOS (False: always run to the token limit, benchmark style).
        plan: A fixed plan instead of the planner's.
        max_cpu_attention_share: The most of a decode batch the planner may attend on the host.
        truncate: Cut prompts too long for the model's context on this side (None: such a
            request stops the job before it starts).
        expert_dtype: `"fp8"`: routed experts stored and streamed as e4m3 with per-output-
            channel scales, dequantised on the device (never silent: the summary, the run
            record and the report say so); None: the model dtype.
        routing: Benchmark routing: every MoE block's router replaced while the engine runs
            (`uniform`, `zipf:s=S,reuse=R` or `replay:TRACES`; `moe_core.routing_for`), its
            draws seeded by `defaults.seed`; None: the model's own routers. Dummy weights
            route almost every token to the same experts, so an offload benchmark sets it
            (docs/moe-gen.md, `--routing`).
        ray: Run on Ray with these settings (None: in this process).
    """

    model: str
    input: Path = field(default_factory=sample_input)
    output: Path = Path("moe-gen-out.jsonl")
    defaults: Defaults = field(default_factory=Defaults)
    gpu_memory_bytes: int = 12 << 30
    host_memory_bytes: int = 64 << 30
    device: str = "cpu"
    dtype: str | None = None
    dummy: bool = False
    num_layers: int | None = None
    eos: bool = True
    plan: Plan | None = None
    max_cpu_attention_share: float = 0.75
    truncate: Truncate | None = None
    expert_dtype: str | None = None
    routing: str | None = None
    ray: RayConfig | None = None

    def __post_init__(self) -> None:
        """Raises `SettingError` naming the option at fault, `DeviceError` for a missing GPU
        (on Ray, each engine checks its own device instead)."""
        if self.device not in ("cpu", "cuda"):
            raise SettingError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.gpu_memory_bytes <= 0 or self.host_memory_bytes <= 0:
            raise SettingError("--gpu-memory and --host-memory must be positive")
        if not 0.0 <= self.max_cpu_attention_share <= 1.0:
            raise SettingError(f"--max-cpu-attention-share must be in [0, 1], got "
                               f"{self.max_cpu_attention_share}")
        if self.expert_dtype not in (None, "fp8"):
            raise SettingError(f"--expert-dtype must be fp8 (or omitted: the model dtype), got "
                               f"{self.expert_dtype!r}")
        if self.num_layers is not None and self.num_layers < 1:
            raise SettingError(f"--num-layers must be at least 1, got {self.num_layers}")
        if self.routing is not None:
            try:
                check_routing(self.routing)
            except SettingError as exc:  # "routing 'x': ..." names the option
                raise SettingError(f"--{exc}") from None
        if self.ray is None:
            check_device(self.device)
        elif importlib.util.find_spec("ray") is None:
            raise SettingError("--ray needs Ray: install the moe-gen[ray] extra")

    def run_dtype(self, spec: ModelSpec) -> torch.dtype:
        """The dtype the job runs `spec` in: `dtype`, else moe-core's rule for `device`."""
        return run_dtype(self.dtype, self.device, spec.torch_dtype)
