"""The seam between the runner and what it measures: a target completes one request and says
when each token arrived, on the same clock (`time.perf_counter`) the runner reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from moe_cap.workload import WorkItem

__all__ = ["Completion", "GenerationSettings", "Target"]


@dataclass(frozen=True)
class GenerationSettings:
    """How every request is generated.

    Attributes:
        max_tokens: Output limit of items that do not set their own.
        temperature: 0 is greedy.
        seed: Sampling seed, where the target takes one.
    """

    max_tokens: int = 128
    temperature: float = 0.0
    seed: int | None = None


@dataclass
class Completion:
    """A finished request as the target returned it.

    Attributes:
        text: Generated text.
        token_times: `time.perf_counter()` when each token (for servers: each streamed chunk
            with content) arrived.
        prompt_tokens: Prompt length, when the target reports it.
        output_tokens: Generated tokens, when the target reports them (else the chunks count).
        finish_reason: Why it stopped.
    """

    text: str = ""
    token_times: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    finish_reason: str | None = None


class Target(Protocol):
    """A system under test."""

    @property
    def label(self) -> str:
        """The record's engine (`"http://host:8000/v1 qwen3"`, `"moe-gen 0.1.0"`)."""
        ...

    async def complete(self, item: WorkItem, settings: GenerationSettings) -> Completion:
        """Generate for `item`, streaming (token times as they arrive).

        Raises:
            TargetError: the request failed (the message says why); the runner records it.
        """
        ...

    async def aclose(self) -> None:
        """Release connections or stop the engine's work."""
        ...
