"""The MoE block: router, routed experts (through an `ExpertExecutor`), optional shared experts.

Dimension key: B batch, T tokens, D hidden, E routed experts, K experts per token.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from moe_core.experts import ExpertExecutor, LocalExperts
from moe_core.layers.mlp import GatedMLP
from moe_core.routing import route
from moe_core.spec import MoESpec

__all__ = ["MoEBlock", "Router", "RoutingObserver", "RoutingOverride"]

RoutingObserver = Callable[[int, torch.Tensor, torch.Tensor], None]
"""Called as `observer(layer, expert_ids [T, K], weights [T, K])` after each routing decision."""

RoutingOverride = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""Replaces the router for benchmarks: `override(hidden [T, D]) -> (expert_ids [T, K] int64,
weights [T, K] float32)` (see `routing_control`)."""


class Router(nn.Module):
    """The linear gate `[E, D]` and the routing rule; DeepSeek-V3 adds a per-expert score bias."""

    def __init__(self, spec: MoESpec, hidden_size: int) -> None:
        super().__init__()
        self.spec = spec
        self.weight = nn.Parameter(torch.empty(spec.num_experts, hidden_size))
        if spec.score_bias:
            self.e_score_correction_bias = nn.Parameter(torch.zeros(spec.num_experts))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Router logits `[T, E]` for `hidden` `[T, D]`."""
        if self.spec.router.fp32_gate:
            return nn.functional.linear(hidden.to(torch.float32), self.weight.to(torch.float32))
        return nn.functional.linear(hidden, self.weight)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(expert_ids [T, K], weights [T, K] float32)` for `hidden` `[T, D]`."""
        bias = getattr(self, "e_score_correction_bias", None)
        return route(self.logits(hidden), self.spec.router, bias)


class MoEBlock(nn.Module):
    """Routes each token to `top_k` experts, runs them through the executor, adds shared experts.

    `executor` defaults to the block's own `experts` (all weights local); the offload runtime
    replaces it with `set_executor`.
    """

    def __init__(self, spec: MoESpec, hidden_size: int, layer: int) -> None:
        super().__init__()
        self.spec = spec
        self.layer = layer
        self.gate = Router(spec, hidden_size)
        self.experts = LocalExperts(spec.num_experts, hidden_size, spec.expert_intermediate_size)
        if spec.shared_intermediate_size:
            self.shared_experts = GatedMLP(hidden_size, spec.shared_intermediate_size,
                                           bias=spec.shared_bias)
            if spec.shared_gate:
                self.shared_experts_gate = nn.Linear(hidden_size, 1, bias=False)
        self.executor: ExpertExecutor
        self.set_executor(self.experts)
        self.observer: RoutingObserver | None = None
        self.routing_override: RoutingOverride | None = None

    def set_executor(self, executor: ExpertExecutor) -> None:
        """Run routed experts through `executor` from now on.

        Kept as a plain attribute, not a registered submodule: an executor need not be an
        `nn.Module`, and the local experts are registered once, as `experts` (registering them
        twice put every expert weight in the state dict twice).
        """
        object.__setattr__(self, "executor", executor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`x` `[B, T, D]` -> `[B, T, D]`."""
        shape = x.shape
        hidden = x.reshape(-1, shape[-1])  # [B*T, D]
        route = self.gate if self.routing_override is None else self.routing_override
        expert_ids, weights = route(hidden)  # [B*T, K] x2
        if self.observer is not None:
            self.observer(self.layer, expert_ids, weights)
        if not getattr(self.executor, "accepts_float32_weights", False):
            weights = weights.to(hidden.dtype)
        out = self.executor(hidden, expert_ids, weights)
        if self.spec.shared_intermediate_size:
            shared = self.shared_experts(hidden)
            if self.spec.shared_gate:
                shared = torch.sigmoid(self.shared_experts_gate(hidden)) * shared
            out = out + shared
        return out.view(shape)
