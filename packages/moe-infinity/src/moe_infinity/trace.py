"""What one request did with the experts: its Expert Activation Matrix and its replay tape.

Dimension key: S forward steps of the request (step 0 is the prefill, each later step decodes one
token), L MoE layers, E routed experts per layer.

The Expert Activation Matrix (EAM) of MoE-Infinity (Xue et al., arXiv:2401.14361 §4) counts the
tokens routed to each expert of each layer; we keep the prefill's and the decode's apart, because
a prompt touches almost every expert while decoding one token touches `top_k` per layer, and an
offloading engine serves the two very differently.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from moe_core import SettingError

from moe_infinity.model_shape import ModelShape

__all__ = ["RequestTrace", "TraceSet"]


@dataclass(frozen=True, eq=False)
class RequestTrace:
    """One request's routing, step by step.

    Attributes:
        request_id: The prompt's id (its line number if the prompt file gave none).
        domain: A label from the prompt file (e.g. `"code"`), or None.
        step_counts: `[S, L, E]` tokens routed to each expert at each step; step 0 is the prefill.
        lookahead: `[S, L, E]` for layer `l >= 1`, layer `l`'s router applied to layer `l-1`'s
            hidden state, summed over the step's tokens (router probabilities; only each
            step's top few experts are kept, the rest are 0). Row `l = 0` is 0 (nothing precedes
            the first MoE layer).
        step_tokens: `[S]` tokens processed at each step.
    """

    request_id: str
    domain: str | None
    step_counts: np.ndarray
    lookahead: np.ndarray
    step_tokens: np.ndarray

    def __post_init__(self) -> None:
        if self.step_counts.ndim != 3 or self.step_counts.shape[0] == 0:
            raise ValueError(f"RequestTrace.step_counts must be [S, L, E] with S >= 1, got "
                             f"{self.step_counts.shape}")
        if self.lookahead.shape != self.step_counts.shape:
            raise ValueError(f"RequestTrace.lookahead must be {self.step_counts.shape}, got "
                             f"{self.lookahead.shape}")
        if self.step_tokens.shape != (self.step_counts.shape[0],):
            raise ValueError(f"RequestTrace.step_tokens must be [S], got {self.step_tokens.shape}")

    @property
    def num_steps(self) -> int:
        """Forward steps (1 prefill + decode steps)."""
        return int(self.step_counts.shape[0])

    @property
    def num_prompt_tokens(self) -> int:
        """Tokens of the prefill step."""
        return int(self.step_tokens[0])

    @property
    def num_decode_tokens(self) -> int:
        """Tokens of the decode steps (one per step at batch 1)."""
        return int(self.step_tokens[1:].sum())

    @property
    def prefill_eam(self) -> np.ndarray:
        """`[L, E]` tokens per expert during the prefill."""
        return self.step_counts[0].astype(np.int64)

    @property
    def decode_eam(self) -> np.ndarray:
        """`[L, E]` tokens per expert during decoding."""
        return self.step_counts[1:].sum(axis=0, dtype=np.int64)

    @property
    def eam(self) -> np.ndarray:
        """`[L, E]` tokens per expert over the whole request."""
        return self.step_counts.sum(axis=0, dtype=np.int64)

    def experts_at(self, step: int, layer: int) -> np.ndarray:
        """Sorted expert indices layer `layer` used at step `step` (the replay tape)."""
        return np.flatnonzero(self.step_counts[step, layer])


@dataclass(frozen=True)
class TraceSet:
    """The traces of a run of prompts, in request order, and the model shape they belong to.

    Attributes:
        shape: The model's routed-expert shape.
        traces: One trace per request, in the order the requests ran.
        settings: How the traces were recorded (generation settings, lookahead form).
    """

    shape: ModelShape
    traces: Sequence[RequestTrace]
    settings: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        want = (self.shape.num_moe_layers, self.shape.num_experts)
        for trace in self.traces:
            if trace.step_counts.shape[1:] != want:
                raise ValueError(f"trace {trace.request_id!r} is [S, {trace.step_counts.shape[1]}"
                                 f", {trace.step_counts.shape[2]}], the model is [S, {want[0]}, "
                                 f"{want[1]}]")

    def __len__(self) -> int:
        return len(self.traces)

    def __iter__(self) -> Iterator[RequestTrace]:
        return iter(self.traces)

    def split(self, build_share: float) -> tuple[list[RequestTrace], list[RequestTrace]]:
        """`(build, evaluate)`: the first `build_share` of the requests, and the rest.

        Raises:
            SettingError: a share outside (0, 1), or a split that leaves either part empty.
        """
        if not 0.0 < build_share < 1.0:
            raise SettingError(f"build share must be in (0, 1), got {build_share}")
        cut = round(len(self.traces) * build_share)
        if cut == 0 or cut == len(self.traces):
            raise SettingError(f"{len(self.traces)} traces cannot be split {build_share:.0%} / "
                             f"{1 - build_share:.0%} with both parts non-empty")
        return list(self.traces[:cut]), list(self.traces[cut:])
