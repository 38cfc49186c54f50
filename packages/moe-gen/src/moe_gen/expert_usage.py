"""Which routed experts each step used: the measured `experts_activated` of the run record
(moe-cap's S-MBU counts only the experts a step actually read; docs/moe-cap.md).

Dimension key: L MoE layers, E experts per layer, T tokens, K experts per token.

A routing observer on every MoE block marks the experts of each routing decision in a `[L, E]`
device table (no host read inside the step); the step's end, which reads the logits anyway,
reads the table once and clears it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from moe_core import MoEForCausalLM

__all__ = ["ExpertUsage"]

Observer = Callable[[int, torch.Tensor, torch.Tensor], None]


class ExpertUsage:
    """Distinct routed experts per MoE layer, step by step (a context manager that installs
    its observers, chained after any already there, and restores them on exit)."""

    def __init__(self, model: MoEForCausalLM) -> None:
        self._blocks = model.moe_blocks()
        self._rows = {block.layer: row for row, block in enumerate(self._blocks)}
        experts = model.spec.moe.num_experts if self._blocks else 0
        self._used = torch.zeros(len(self._blocks), experts, dtype=torch.bool,
                                 device=model.device)  # [L, E]
        self._previous = [block.observer for block in self._blocks]

    def __enter__(self) -> ExpertUsage:
        for block, previous in zip(self._blocks, self._previous, strict=True):
            block.observer = self._observer(previous)
        return self

    def __exit__(self, *exc: object) -> None:
        for block, previous in zip(self._blocks, self._previous, strict=True):
            block.observer = previous

    def _observer(self, previous: Observer | None) -> Observer:
        def observe(layer: int, expert_ids: torch.Tensor, weights: torch.Tensor) -> None:
            ids = expert_ids.reshape(-1).to(self._used.device)  # [T*K]
            self._used[self._rows[layer]].index_fill_(0, ids, True)
            if previous is not None:
                previous(layer, expert_ids, weights)
        return observe

    def take(self) -> tuple[int, ...] | None:
        """Distinct experts each MoE layer used since the last call (None: a dense model)."""
        if not self._blocks:
            return None
        counts = self._used.sum(dim=1).tolist()  # [L], one host read
        self._used.zero_()
        return tuple(int(c) for c in counts)
