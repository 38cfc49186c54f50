"""Tracing a running batch: each row's expert counts and lookahead, per engine pass.

Dimension key: b rows of the pass, n real tokens, K experts per token, L MoE layers, E routed
experts.

`ActivationTracer` records one request at a time; the engine's passes hold many requests, each
row a different one. This tracer attaches the same two hooks of moe-core's step interface (each
MoE block's routing `observer`, and each layer's `mix_observer` for the lookahead: layer l+1's
router on layer l's residual stream under layer l+1's norm) and adds every token's routing to
its own row with `index_add_`, using the pass's token-to-row map. Everything stays on the
model's device until `end_pass`, which copies the two `[b, L, E]` tensors to the host once.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType

import numpy as np
import torch
from moe_core import DecoderLayer, MixObserver, MoEBlock, MoEForCausalLM

from moe_infinity.lookahead_observers import attach_lookahead, detach_lookahead

__all__ = ["LiveTracer", "PassRouting"]

_Observer = Callable[[int, torch.Tensor, torch.Tensor], None]
PassRouting = tuple[np.ndarray, np.ndarray]
"""`(counts [b, L, E] int32, lookahead [b, L, E] float32)` of one pass."""


class LiveTracer:
    """Per-row routing of every pass while attached (a context manager).

    Attributes:
        num_experts: E.
        num_layers: L (MoE layers).
    """

    def __init__(self, model: MoEForCausalLM) -> None:
        self._model = model
        self._blocks: list[MoEBlock] = model.moe_blocks()
        if not self._blocks:
            raise ValueError("the model has no MoE blocks to trace")
        self.num_experts = self._blocks[0].spec.num_experts
        self.num_layers = len(self._blocks)
        self._row = {block.layer: row for row, block in enumerate(self._blocks)}
        self._rows: torch.Tensor | None = None  # [n] row of each real token of the pass
        self._counts: torch.Tensor | None = None  # [b, L, E]
        self._looks: torch.Tensor | None = None  # [b, L, E]
        self._previous: list[_Observer | None] = []
        self._previous_mix: list[MixObserver | None] = []

    def __enter__(self) -> LiveTracer:
        self._previous = [block.observer for block in self._blocks]
        for block, previous in zip(self._blocks, self._previous, strict=True):
            block.observer = self._counting(previous)
        self._previous_mix = attach_lookahead(self._model, self._blocks, self._lookahead)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for block, previous in zip(self._blocks, self._previous, strict=True):
            block.observer = previous
        detach_lookahead(self._model, self._previous_mix)

    @property
    def chains_other_observers(self) -> bool:
        """Whether observers set before this tracer attached run after its own (a captured pass
        needs none: their host code would run once, at capture)."""
        return (any(p is not None for p in self._previous)
                or any(p is not None for p in self._previous_mix))

    def begin_pass(self, row_of_token: torch.Tensor, num_rows: int) -> None:
        """Start a pass whose real tokens belong to rows `row_of_token` `[n]`."""
        shape = (num_rows, self.num_layers, self.num_experts)
        device = self._model.device
        self._rows = row_of_token.to(device)
        self._counts = torch.zeros(shape, dtype=torch.int32, device=device)
        self._looks = torch.zeros(shape, dtype=torch.float32, device=device)

    def end_pass(self) -> PassRouting:
        """The pass's `(counts, lookahead)`, both `[b, L, E]`, on the host.

        Raises:
            RuntimeError: no pass was begun.
        """
        if self._counts is None or self._looks is None:
            raise RuntimeError("end_pass without begin_pass")
        counts, looks = self._counts.cpu().numpy(), self._looks.cpu().numpy()
        self._rows = self._counts = self._looks = None
        return counts, looks

    def drop_pass(self) -> tuple[torch.Tensor, torch.Tensor]:
        """End the pass without reading it: its `(counts, lookahead)` device tensors (a captured
        pass keeps them as the graph's outputs and reads them after each replay).

        Raises:
            RuntimeError: no pass was begun.
        """
        if self._counts is None or self._looks is None:
            raise RuntimeError("drop_pass without begin_pass")
        counts, looks = self._counts, self._looks
        self._rows = self._counts = self._looks = None
        return counts, looks

    def _flat_index(self, layer_row: int, per_token: torch.Tensor) -> torch.Tensor:
        """Flat indices into `[b, L, E]` of `per_token` `[n, X]` expert ids of each token."""
        assert self._rows is not None
        base = (self._rows * self.num_layers + layer_row) * self.num_experts  # [n]
        return (base[:, None] + per_token).reshape(-1)

    def _counting(self, previous: _Observer | None) -> _Observer:
        def observer(layer: int, expert_ids: torch.Tensor, weights: torch.Tensor) -> None:
            if self._counts is not None:
                ids = expert_ids.reshape(-1, expert_ids.shape[-1])  # [n, K]
                flat = self._flat_index(self._row[layer], ids)
                ones = torch.ones(flat.shape, dtype=torch.int32, device=flat.device)
                self._counts.view(-1).index_add_(0, flat, ones)
            if previous is not None:
                previous(layer, expert_ids, weights)

        return observer

    def _lookahead(self, row: int, nxt: DecoderLayer, previous: MixObserver | None
                   ) -> MixObserver:
        def observer(layer: int, h: torch.Tensor, x: torch.Tensor) -> None:
            if self._looks is not None:
                probs = torch.softmax(nxt.router_logits(h).float(), dim=-1)  # [n, E]
                experts = torch.arange(self.num_experts, device=probs.device)
                flat = self._flat_index(row, experts.expand(probs.shape[0], -1))
                self._looks.view(-1).index_add_(0, flat, probs.reshape(-1))
            if previous is not None:
                previous(layer, h, x)

        return observer
