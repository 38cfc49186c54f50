"""One request's routing collected pass by pass into a `RequestTrace`.

Dimension key: S steps of the request, L MoE layers, E routed experts.

The engine prefills a prompt in chunks, possibly over several passes; the trace format's step 0
is the whole prefill, so the chunks' counts are summed into it. Each decode pass is one step.
Lookahead scores keep each step's top `lookahead_top` experts per layer, as the batch-1 tracer
does.
"""

from __future__ import annotations

import numpy as np

from moe_infinity.trace import RequestTrace

__all__ = ["TraceRecorder"]


class TraceRecorder:
    """Accumulates one request's steps."""

    def __init__(self, num_layers: int, num_experts: int, lookahead_top: int) -> None:
        self._dims = (num_layers, num_experts)
        self._top = min(num_experts, lookahead_top)
        self._counts: list[np.ndarray] = []  # per step [L, E]
        self._looks: list[np.ndarray] = []
        self._tokens: list[int] = []

    @property
    def num_steps(self) -> int:
        """Steps recorded so far (the prefill counts as one)."""
        return len(self._counts)

    def add(self, counts: np.ndarray, lookahead: np.ndarray, num_tokens: int,
            prefill: bool) -> None:
        """Add one pass's row: `counts` and `lookahead` `[L, E]` over `num_tokens` tokens; a
        prefill chunk joins step 0."""
        if prefill and self._counts:
            self._counts[0] = self._counts[0] + counts
            self._looks[0] = self._looks[0] + lookahead
            self._tokens[0] += num_tokens
            return
        self._counts.append(counts.astype(np.int32))
        self._looks.append(lookahead.astype(np.float32))
        self._tokens.append(num_tokens)

    @property
    def eam(self) -> np.ndarray:
        """`[L, E]` tokens per expert so far."""
        if not self._counts:
            return np.zeros(self._dims, dtype=np.int64)
        return np.asarray(np.sum(self._counts, axis=0, dtype=np.int64))

    def trace(self, request_id: str) -> RequestTrace:
        """The request's `RequestTrace`.

        Raises:
            ValueError: nothing was recorded.
        """
        if not self._counts:
            raise ValueError(f"request {request_id!r} ran no pass")
        looks = np.stack(self._looks)  # [S, L, E]
        if self._top < self._dims[1]:
            cut = -np.partition(-looks, self._top - 1, axis=-1)[..., self._top - 1 : self._top]
            looks = np.where(looks >= cut, looks, 0.0)
        looks[:, 0] = 0.0  # nothing precedes the first MoE layer
        return RequestTrace(request_id, None, np.stack(self._counts).astype(np.int32),
                            looks.astype(np.float32), np.array(self._tokens, dtype=np.int64))
