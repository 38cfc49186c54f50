"""The interface of an in-process streaming engine, and the thread that runs one behind the
runner's async `Target` protocol.

An engine owns its model and runs on one thread; requests queue for it in arrival order, so the
client-side TTFT of a queued request includes its wait (as it would behind a server). Token
times are `time.perf_counter()` read on the engine thread: the runner's clock.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from moe_cap.run_record import StepRecord
from moe_cap.target import Completion, GenerationSettings
from moe_cap.workload import WorkItem

__all__ = ["EngineInfo", "EngineTarget", "StreamingEngine"]


@dataclass(frozen=True)
class EngineInfo:
    """What the run record says about an engine's model.

    Attributes:
        label: Engine name and version (the record's `engine`).
        model: The model as the user named it.
        weight_dtype: Storage format of the weights (`bf16`, `fp32`).
        num_layers: Decoder layers run, when truncated.
        gpu: The hardware-table GPU name, or `none` on the CPU.
        expert_dtype: Storage format of the routed experts when it differs from
            `weight_dtype` (`fp8`), else None.
    """

    label: str
    model: str
    weight_dtype: str
    num_layers: int | None
    gpu: str
    expert_dtype: str | None = None


class StreamingEngine(Protocol):
    """A model that generates one request at a time, calling back as each token appears."""

    @property
    def info(self) -> EngineInfo:
        """The model and engine, for the record."""
        ...

    def generate(self, item: WorkItem, settings: GenerationSettings,
                 on_token: Callable[[], None], cancelled: threading.Event) -> Completion:
        """Generate for `item`, calling `on_token()` once per token; stop early once
        `cancelled` is set."""
        ...

    def steps(self) -> list[StepRecord]:
        """Every forward step run so far, in order."""
        ...

    def counters(self) -> dict[str, float]:
        """Expert hits, misses and bytes copied so far (empty without offloading)."""
        ...


class EngineTarget:
    """A `StreamingEngine` as a runner `Target`: requests run on one engine thread."""

    def __init__(self, engine: StreamingEngine) -> None:
        self.engine = engine
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moe-cap-engine")
        self._cancelled = threading.Event()

    @property
    def label(self) -> str:
        """The engine's label."""
        return self.engine.info.label

    async def complete(self, item: WorkItem, settings: GenerationSettings) -> Completion:
        """Queue `item` on the engine thread and wait for it."""
        times: list[float] = []

        def run() -> Completion:
            out = self.engine.generate(item, settings,
                                       lambda: times.append(time.perf_counter()), self._cancelled)
            out.token_times = times
            return out

        return await asyncio.get_running_loop().run_in_executor(self._thread, run)

    async def aclose(self) -> None:
        """Stop the running request at its next token and let the thread end."""
        self.close()

    def close(self) -> None:
        """As `aclose`, from synchronous code (after an interruption)."""
        self._cancelled.set()
        self._thread.shutdown(wait=True, cancel_futures=True)
