"""What the client measured of one request, on its own clock: the per-request rows of a run
(`<record>.requests.jsonl`, one JSON object a line, written as each request ends)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RequestResult"]


@dataclass(frozen=True)
class RequestResult:
    """One request.

    Attributes:
        id: The workload item's id (a cycled workload repeats ids; `index` is unique).
        index: Order in which the request was sent.
        start_s: When it was sent, seconds from the start of the run.
        e2e_s: Sent to last byte received (None when it failed).
        ttft_s: Sent to first generated token (None: failed, no token, or not streamed).
        itl_s: Gaps between consecutive streamed tokens (chunks), in order.
        prompt_tokens: Prompt tokens as the target counted them (None: not reported).
        output_tokens: Generated tokens (the target's count, else streamed chunks).
        finish_reason: The target's reason (`"stop"`, `"length"`, ...).
        error: Why the request failed (None: it succeeded).
        text: The generated text.
    """

    id: str
    index: int
    start_s: float
    e2e_s: float | None
    ttft_s: float | None
    itl_s: tuple[float, ...]
    prompt_tokens: int | None
    output_tokens: int
    finish_reason: str | None
    error: str | None = None
    text: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the request succeeded."""
        return self.error is None and self.e2e_s is not None

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first: `(e2e - ttft) / (output_tokens - 1)`."""
        if self.e2e_s is None or self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def to_dict(self) -> dict[str, object]:
        """The JSONL row."""
        return {"id": self.id, "index": self.index, "start_s": self.start_s,
                "ttft_s": self.ttft_s, "tpot_s": self.tpot_s, "e2e_s": self.e2e_s,
                "itl_s": list(self.itl_s), "prompt_tokens": self.prompt_tokens,
                "output_tokens": self.output_tokens, "finish_reason": self.finish_reason,
                "error": self.error, "text": self.text}
