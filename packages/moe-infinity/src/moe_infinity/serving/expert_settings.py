"""How the served model's weights and experts are set up beyond the budget: dummy weights of a
shape, truncation, the experts' storage (FP8), the offload runtime's fetch path, and benchmark
routing.

Why these exist: `moe-infinity serve qwen3-30b-a3b --dummy --num-layers 24 --routing uniform`
is benchmark scenario S3 (BENCHMARKS.md). Dummy weights route almost every decode token to the
same experts, which flatters the expert cache, so a benchmark sets the routing explicitly
(`moe_core.routing_for`). `--fetch mapped` (optionally `--lanes 2`) is moe-core's fastest
batch-1 path for the decode rows: the GPU reads missed experts from pinned host memory with no
host synchronisation per layer (prefill chunks still copy through the cache, unless `--prefill
stream`: they then stream their misses through a small ring of staging slots at the link's rate
and leave the cache as the decode left it, moe-core's decision 0018). `--expert-dtype
fp8` holds the routed experts as e4m3 with a scale per output channel (moe-core's
`load_offloaded`): half of bf16's bytes in host memory, over PCIe and in the slots, so about
twice the experts fit the same budget; opt-in, never silent. The names and help texts mirror
`moe-core generate` and `moe-gen run`.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Literal

from moe_core import (
    PREFILL_MODES,
    ModelSpec,
    MoEForCausalLM,
    SettingError,
    check_fetch_lanes,
    check_routing,
    routing_for,
)

from moe_infinity.routing_tape import load_routing_tape

__all__ = ["ExpertSettings"]


@dataclass(frozen=True, kw_only=True)
class ExpertSettings:
    """Weights, truncation, expert storage, fetch path and routing of a served model.

    Attributes:
        dummy: Random weights of the model's shapes (a shipped shape needs no files; one that
            ships no tokenizer gets `moe_core.word_tokenizer`).
        num_layers: Keep only the first N decoder layers (None: all).
        expert_dtype: `"fp8"`: routed experts held as e4m3 with per-output-channel scales,
            quantised at load and dequantised on the device before their products (the
            start-up line says so); None: the model dtype.
        fetch: `copy` (misses copied into the cache, which the policy manages) or `mapped`
            (decode rows read misses from pinned host memory on the GPU; the cache holds the
            experts loaded at start).
        lanes: With `mapped`: 1 (the GPU reads every miss) or 2 (each layer's misses split
            between the GPU's reads and the CPU).
        prefill: `admit` (prompt chunks copy their misses into the cache, evicting others) or
            `stream` (they stream them through a ring of staging slots taken from the expert
            budget, and admit none).
        routing: Benchmark routing (`uniform`, `zipf:s=S,reuse=R`, `replay:TRACES`) replacing
            the routers while the engine runs, or None (the model's own routers).
    """

    dummy: bool = False
    num_layers: int | None = None
    expert_dtype: str | None = None
    fetch: Literal["copy", "mapped"] = "copy"
    lanes: int = 1
    prefill: Literal["admit", "stream"] = "admit"
    routing: str | None = None

    def __post_init__(self) -> None:
        if self.num_layers is not None and self.num_layers < 1:
            raise SettingError(f"--num-layers must be at least 1, got {self.num_layers}")
        if self.expert_dtype not in (None, "fp8"):
            raise SettingError(f"--expert-dtype must be fp8 (or omitted: the model dtype), got "
                               f"{self.expert_dtype!r}")
        check_fetch_lanes(self.fetch, self.lanes)
        if self.prefill not in PREFILL_MODES:
            raise SettingError(f"--prefill must be admit or stream, got {self.prefill!r}")
        if self.routing is not None:
            try:
                check_routing(self.routing)
            except SettingError as exc:
                raise SettingError(f"--{exc}") from None

    def spec_of(self, spec: ModelSpec) -> ModelSpec:
        """`spec` as served (truncated to `num_layers`).

        Raises:
            SettingError: `num_layers` exceeds the model's layers.
        """
        if self.num_layers is None:
            return spec
        if self.num_layers > spec.num_layers:
            raise SettingError(f"--num-layers {self.num_layers}: the model has "
                               f"{spec.num_layers} layers")
        return spec.truncated(self.num_layers)

    def routing_context(self, model: MoEForCausalLM) -> AbstractContextManager[None]:
        """The benchmark routing over `model`'s MoE blocks (entered by the engine thread for
        its whole life), or a context that changes nothing.

        Raises:
            SettingError / TraceFileError: a bad spec or an unreadable replay file.
        """
        if self.routing is None:
            return nullcontext()
        return routing_for(model, self.routing, tape_loader=load_routing_tape)
