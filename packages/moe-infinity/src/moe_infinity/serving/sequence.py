"""One request's state inside the engine: its KV blocks, how much of it is cached, its output.

Holds no model tensors: the scheduler decides from it who runs, the engine thread advances it.
A sequence's tokens are its prompt followed by its output; those not yet in the KV pool are
`pending_ids` (a prompt chunk while prefilling, then the one token being decoded).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from moe_infinity.serving.request import (
    FinishReason,
    GenerationRequest,
    SequenceEvent,
    TokenLogprob,
)
from moe_infinity.serving.text_stream import TextDecoder, TextStream

__all__ = ["EventSink", "Sequence"]

EventSink = Callable[[SequenceEvent], None]
"""Receives a request's events; called on the engine thread, so it must not block."""


class Sequence:
    """A request being served.

    Attributes:
        request: What was asked.
        sink: Where its events go.
        arrival_s: `time.perf_counter()` when it was submitted.
        table: Its KV blocks once admitted, else None.
        num_cached: Its tokens whose keys and values are in the pool.
        output_ids: Tokens generated so far.
        finish_reason: Why it ended, once it has.
        first_token_s: When its first token was sampled (None before).
        last_token_s: When its latest token was sampled.
    """

    def __init__(self, request: GenerationRequest, sink: EventSink, decode: TextDecoder,
                 device: torch.device) -> None:
        self.request = request
        self.sink = sink
        self.arrival_s = time.perf_counter()
        self.table: list[int] | None = None
        self.num_cached = 0
        self.output_ids: list[int] = []
        self.finish_reason: FinishReason | None = None
        self.first_token_s: float | None = None
        self.last_token_s: float | None = None
        self.text = TextStream(decode, request.stop)
        self.generator = request.sampling.generator(device)

    @property
    def request_id(self) -> str:
        """The request's id."""
        return self.request.request_id

    @property
    def num_prompt_tokens(self) -> int:
        """Tokens of the prompt."""
        return len(self.request.prompt_ids)

    @property
    def is_prefilling(self) -> bool:
        """Whether part of the prompt is still not in the KV pool."""
        return self.num_cached < self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        """Whether the request has ended."""
        return self.finish_reason is not None

    def pending_ids(self, limit: int | None = None) -> list[int]:
        """Tokens not yet in the pool (at most `limit`): the rest of the prompt, or the last
        output token."""
        if self.is_prefilling:
            end = self.num_prompt_tokens if limit is None else min(
                self.num_prompt_tokens, self.num_cached + limit)
            return list(self.request.prompt_ids[self.num_cached : end])
        return self.output_ids[self.num_cached - self.num_prompt_tokens :][:limit]

    def emit(self, text: str, token_ids: tuple[int, ...],
             logprobs: tuple[TokenLogprob, ...] | None = None,
             finish_reason: FinishReason | None = None, error: str | None = None) -> None:
        """Send an event with the request's counts to its sink."""
        self.sink(SequenceEvent(self.request_id, text, token_ids, logprobs, finish_reason,
                                self.num_prompt_tokens, len(self.output_ids), error))
