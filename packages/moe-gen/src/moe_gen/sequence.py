"""A running sequence's state, and the result it turns into once it stops."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from moe_core import SamplingParams

__all__ = ["FinishReason", "GenResult", "Sequence"]

FinishReason = Literal["eos", "length", "stop"]


@dataclass(frozen=True)
class GenResult:
    """One finished request.

    Attributes:
        id: The request's id.
        index: Its position in the input.
        text: Generated text (None without a tokenizer); cut before a stop string.
        token_ids: Generated tokens (an EOS token included).
        prompt_tokens: Prompt length in tokens.
        finish_reason: `"eos"`, `"length"` or `"stop"`.
    """

    id: str
    index: int
    text: str | None
    token_ids: tuple[int, ...]
    prompt_tokens: int
    finish_reason: FinishReason

    @property
    def completion_tokens(self) -> int:
        """Generated tokens."""
        return len(self.token_ids)

    def to_dict(self) -> dict[str, object]:
        """The output-file line (with the generated `token_ids` where there is no text: a model
        without a tokenizer, e.g. a shipped shape run with `--dummy`)."""
        line: dict[str, object] = {
            "id": self.id, "text": self.text, "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens, "finish_reason": self.finish_reason}
        if self.text is None:
            line["token_ids"] = list(self.token_ids)
        return line


@dataclass
class Sequence:
    """A request on its way through the engine.

    Attributes:
        id: Request id.
        index: Position in the input.
        prompt_ids: Prompt tokens.
        max_new_tokens: Its limit.
        sampling: How its tokens are chosen.
        stop: Stop strings.
        generator: Its own seeded sampling generator (None: greedy or unseeded).
        page_table: Its KV pages once admitted.
        num_cached: Tokens in the KV cache.
        output_ids: Tokens generated so far.
        pending: Tokens to feed at the next step.
    """

    id: str
    index: int
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...] = ()
    generator: torch.Generator | None = None
    page_table: list[int] = field(default_factory=list)
    num_cached: int = 0
    output_ids: list[int] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)

    @property
    def max_tokens(self) -> int:
        """KV slots it may need: prompt plus limit."""
        return len(self.prompt_ids) + self.max_new_tokens
