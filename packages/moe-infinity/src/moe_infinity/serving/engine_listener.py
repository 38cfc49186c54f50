"""What the engine reports as requests progress (the Prometheus metrics implement it)."""

from __future__ import annotations

from typing import Protocol

from moe_infinity.serving.request import FinishReason

__all__ = ["EngineListener", "NullListener"]


class EngineListener(Protocol):
    """Called on the engine thread; must be quick and must not raise."""

    def on_first_token(self, seconds: float) -> None:
        """A request's first token, `seconds` after it arrived (time to first token)."""
        ...

    def on_next_token(self, seconds: float) -> None:
        """A later token, `seconds` after the request's previous one (inter-token latency)."""
        ...

    def on_finished(self, reason: FinishReason, seconds: float, num_prompt_tokens: int,
                    num_output_tokens: int) -> None:
        """A request ended, `seconds` after it arrived."""
        ...


class NullListener:
    """Reports nothing."""

    def on_first_token(self, seconds: float) -> None:
        """Nothing."""

    def on_next_token(self, seconds: float) -> None:
        """Nothing."""

    def on_finished(self, reason: FinishReason, seconds: float, num_prompt_tokens: int,
                    num_output_tokens: int) -> None:
        """Nothing."""
