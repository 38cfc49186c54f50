"""What the engine is asked to do for one request, and what it reports back, token by token.

The HTTP front end and the terminal chat both build a `GenerationRequest` (token ids, limits and
sampling already checked) and receive `SequenceEvent`s from the engine thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from moe_core import SamplingParams

__all__ = ["FinishReason", "GenerationRequest", "SequenceEvent", "TokenLogprob"]

FinishReason = Literal["stop", "length", "cancelled"]
"""`stop`: an end-of-sequence token or a stop string; `length`: the token limit; `cancelled`:
the client went away or the server shut down before the request finished."""


@dataclass(frozen=True, kw_only=True)
class GenerationRequest:
    """One generation, checked and tokenised.

    Attributes:
        request_id: Unique id (the front end's `cmpl-...` / `chatcmpl-...`).
        prompt_ids: The prompt's tokens (chat requests: rendered with the chat template).
        max_tokens: Most new tokens.
        sampling: Temperature, top-k, top-p, seed.
        stop: Strings that end the generation (not included in the text).
        logprobs: None: no log-probabilities; k >= 0: the chosen token's and the k most likely.
        ignore_eos: Keep generating past end-of-sequence tokens (benchmarks: a fixed length).
    """

    request_id: str
    prompt_ids: tuple[int, ...]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("GenerationRequest.prompt_ids must hold at least one token")
        if self.max_tokens < 1:
            raise ValueError(f"GenerationRequest.max_tokens must be >= 1, got {self.max_tokens}")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"GenerationRequest.logprobs must be >= 0, got {self.logprobs}")

    @property
    def num_reserved_tokens(self) -> int:
        """KV tokens the request may need: its prompt and every new token."""
        return len(self.prompt_ids) + self.max_tokens


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probability of a generated token under the model (before temperature and filtering).

    Attributes:
        token_id: The generated token.
        logprob: Its natural-log probability.
        top: The most likely tokens at that step and theirs, best first.
    """

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class SequenceEvent:
    """New output of one request, sent from the engine thread.

    Attributes:
        request_id: The request.
        text: New text since the last event (held back while it might start a stop string).
        token_ids: New tokens since the last event.
        logprobs: One entry per new token when the request asked for them.
        finish_reason: Set on the request's last event, None before.
        num_prompt_tokens: The prompt's tokens.
        num_output_tokens: Tokens generated so far.
        error: Set when the engine failed the request (a bug, not the client's fault).
    """

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] | None
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int
    error: str | None = None
