"""The run record moe-cap reads (docs/moe-cap.md): engine, model, dtypes, GPU, wall time, tokens,
the benchmark routing when one was set, and every step as `[past_tokens, new_tokens]` pairs with
its host-to-device bytes."""

from __future__ import annotations

from collections.abc import Sequence

import torch

import moe_gen
from moe_gen.batch_loop import StepStats

__all__ = ["precision_name", "run_record"]

_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def precision_name(dtype: torch.dtype) -> str:
    """moe-cap's name of a torch dtype."""
    return _NAMES.get(dtype, str(dtype).removeprefix("torch."))


def run_record(model: str, dtype: torch.dtype, gpu: str, wall_seconds: float,
               steps: Sequence[StepStats], num_layers: int | None,
               expert_dtype: str | None = None, routing: str | None = None
               ) -> dict[str, object]:
    """The JSON-ready run record (only the fields moe-cap knows: it rejects others); with
    `expert_dtype` (`"fp8"`) the routed experts' storage differs from the model dtype, and
    the products still run in the model dtype (`compute_dtype`); with `routing` the routers
    were replaced by that benchmark routing (`JobConfig.routing`)."""
    record: dict[str, object] = {
        "format": "moe-cap/run-record", "version": 1, "engine": f"moe-gen {moe_gen.__version__}",
        "model": model, "weight_dtype": precision_name(dtype), "kv_dtype": precision_name(dtype),
        "gpu": gpu, "wall_seconds": max(wall_seconds, sum(s.seconds for s in steps), 1e-9),
        "input_tokens": sum(n for s in steps if s.phase == "prefill" for p, n in s.chunks
                            if p == 0),
        "output_tokens": sum(len(s.chunks) for s in steps),
        "steps": [_step(s) for s in steps],
    }
    if num_layers is not None:
        record["num_layers"] = num_layers
    if expert_dtype is not None:
        record["expert_dtype"] = expert_dtype
        record["compute_dtype"] = precision_name(dtype)
    if routing is not None:
        record["routing"] = routing
    return record


def _step(s: StepStats) -> dict[str, object]:
    """One step's entry (its measured `experts_activated` where it was measured)."""
    step: dict[str, object] = {"phase": s.phase, "seconds": max(s.seconds, 1e-9),
                               "chunks": [list(c) for c in s.chunks], "h2d_bytes": s.h2d_bytes}
    if s.experts_activated is not None:
        step["experts_activated"] = list(s.experts_activated)
    return step
