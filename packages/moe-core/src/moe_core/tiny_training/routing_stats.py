"""How often each expert of each MoE layer is chosen, and how differently two domains choose.

Dimension key: T tokens, K experts per token, L MoE layers, E routed experts, D domains.

Domain dependence is measured with the Jensen-Shannon divergence (Lin 1991, "Divergence measures
based on the Shannon entropy", IEEE Trans. Inf. Theory 37(1)) between two domains' expert
distributions in the same layer, in bits: 0 for identical routing, 1 for disjoint experts. It is
symmetric and bounded, unlike the KL divergence, so a mean over layers and domain pairs is
meaningful.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType

import numpy as np
import torch

from moe_core.model import MoEForCausalLM
from moe_core.moe_block import RoutingObserver

__all__ = ["RoutingCounter", "js_divergence", "mean_over_pairs", "pairwise_js", "routing_shares"]


class RoutingCounter:
    """Counts the top-k assignments of every (MoE layer, expert) while attached to a model.

    Use it as a context manager around forward passes; an observer already set on a block is
    still called, and is put back on exit:

        with RoutingCounter(model) as counter:
            model(input_ids)
        counter.counts  # [L, E]

    Attributes:
        moe_layers: Decoder-layer index of each row of `counts`.
        num_experts: Routed experts per MoE layer.
    """

    def __init__(self, model: MoEForCausalLM) -> None:
        self._blocks = model.moe_blocks()
        if not self._blocks:
            raise ValueError("the model has no MoE blocks to observe")
        self.moe_layers: tuple[int, ...] = tuple(block.layer for block in self._blocks)
        self.num_experts = self._blocks[0].spec.num_experts
        self._row = {layer: row for row, layer in enumerate(self.moe_layers)}
        self._counts = torch.zeros(len(self._blocks), self.num_experts, dtype=torch.long,
                                   device=model.device)  # [L, E]
        self._previous: list[RoutingObserver | None] = []

    def observe(self, layer: int, expert_ids: torch.Tensor, weights: torch.Tensor) -> None:
        """Add one routing decision (`expert_ids` `[T, K]`) of decoder layer `layer`."""
        del weights  # a count of assignments, whatever their weight
        self._counts[self._row[layer]] += torch.bincount(expert_ids.reshape(-1),
                                                         minlength=self.num_experts)

    def _chained(self, previous: RoutingObserver | None) -> RoutingObserver:
        def observer(layer: int, expert_ids: torch.Tensor, weights: torch.Tensor) -> None:
            self.observe(layer, expert_ids, weights)
            if previous is not None:
                previous(layer, expert_ids, weights)

        return observer

    def __enter__(self) -> RoutingCounter:
        if self._previous:
            raise RuntimeError("this RoutingCounter is already attached")
        self._previous = [block.observer for block in self._blocks]
        for block, previous in zip(self._blocks, self._previous, strict=True):
            block.observer = self._chained(previous)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        for block, previous in zip(self._blocks, self._previous, strict=True):
            block.observer = previous
        self._previous = []

    @property
    def counts(self) -> np.ndarray:
        """Assignments so far `[L, E]` int64; each row sums to tokens x top-k."""
        return self._counts.cpu().numpy()


def routing_shares(counts: np.ndarray) -> np.ndarray:
    """Each layer's counts `[L, E]` as a distribution over its experts `[L, E]` (rows sum to 1).

    Raises:
        ValueError: a negative count, or a layer that saw no tokens.
    """
    counts = np.asarray(counts, dtype=np.float64)
    totals = counts.sum(axis=-1, keepdims=True)  # [L, 1]
    if np.any(counts < 0) or np.any(totals <= 0):
        raise ValueError("routing counts must be non-negative with at least one per layer")
    return counts / totals


def _distribution(x: np.ndarray, name: str) -> np.ndarray:
    p = np.asarray(x, dtype=np.float64)
    if p.ndim != 1 or not np.all(np.isfinite(p)) or np.any(p < 0) or not p.sum() > 0:
        raise ValueError(f"{name} must be a 1-D array of finite non-negative weights, not all 0")
    return p / p.sum()


def _kl_bits(p: np.ndarray, m: np.ndarray) -> float:
    """KL(p || m) in bits, where m > 0 wherever p > 0 (0 log 0 counts as 0)."""
    used = p > 0
    return float(np.sum(p[used] * np.log2(p[used] / m[used])))


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence of two distributions over the same outcomes, in bits, in [0, 1].

    Both are normalised first, so raw counts may be passed.

    Raises:
        ValueError: shapes differ, or either is not a 1-D array of non-negative weights.
    """
    p, q = _distribution(p, "p"), _distribution(q, "q")
    if p.shape != q.shape:
        raise ValueError(f"p and q must have the same shape, got {p.shape} and {q.shape}")
    m = 0.5 * (p + q)
    # Rounding can put a JS of 0 a hair below 0, or of 1 a hair above; clip to the true range.
    return float(np.clip(0.5 * (_kl_bits(p, m) + _kl_bits(q, m)), 0.0, 1.0))


def pairwise_js(shares: Sequence[np.ndarray]) -> np.ndarray:
    """JS divergence per layer between every two domains: `[D, D, L]` from D matrices `[L, E]`."""
    num_domains, num_layers = len(shares), np.shape(shares[0])[0]
    out = np.zeros((num_domains, num_domains, num_layers))  # [D, D, L]
    for i in range(num_domains):
        for j in range(i + 1, num_domains):
            for layer in range(num_layers):
                out[i, j, layer] = out[j, i, layer] = js_divergence(shares[i][layer],
                                                                    shares[j][layer])
    return out


def mean_over_pairs(values: np.ndarray) -> np.ndarray:
    """Mean over distinct domain pairs (i < j) of `[D, D, ...]` -> `[...]`.

    Raises:
        ValueError: fewer than two domains.
    """
    num_domains = values.shape[0]
    if num_domains < 2:
        raise ValueError("a mean over domain pairs needs at least two domains")
    i, j = np.triu_indices(num_domains, k=1)
    return np.asarray(values[i, j].mean(axis=0))
