"""How many distinct routed experts a step touches: expected under uniform routing, and measured.

A step that runs `T` tokens through a MoE layer with `E` experts and top-`k` routing reads every
expert at least one of its tokens chose. Under uniform routing each token picks `k` distinct
experts out of `E`, so a given expert escapes one token with probability `1 - k/E`, escapes all
`T` with `(1 - k/E)^T`, and the expected number read is

    E * (1 - (1 - k/E)^T)

which is `k` at `T = 1` and tends to `E` as `T` grows. Shared experts run for every token and are
counted separately. Real routers are not uniform (they favour some experts, and consecutive tokens
agree), so a run's measured counts are reported beside the expectation, never replaced by it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from moe_core import ModelSpec

from moe_cap.errors import MoECapError

__all__ = [
    "ActivatedExperts",
    "activated_experts",
    "count_distinct_experts",
    "expected_distinct_experts",
]


def expected_distinct_experts(num_experts: int, top_k: int, num_tokens: int) -> float:
    """`E * (1 - (1 - k/E)^T)`: expected distinct experts `T` uniformly routed tokens touch.

    Raises:
        ValueError: `num_experts` or `top_k` not positive, `top_k > num_experts`, or
            `num_tokens` negative.
    """
    if num_experts <= 0 or top_k <= 0:
        raise ValueError(f"num_experts and top_k must be positive, got {num_experts}, {top_k}")
    if top_k > num_experts:
        raise ValueError(f"top_k ({top_k}) exceeds num_experts ({num_experts})")
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be non-negative, got {num_tokens}")
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** num_tokens)


@dataclass(frozen=True)
class ActivatedExperts:
    """Routed experts one step reads, per MoE layer, plus the always-active shared experts.

    Attributes:
        num_tokens: Tokens the step ran through each MoE layer.
        expected: Expected distinct routed experts per MoE layer under uniform routing.
        measured: Distinct routed experts the run actually used per MoE layer, if recorded.
        num_shared: Shared experts per MoE layer (they run for every token).
    """

    num_tokens: int
    expected: tuple[float, ...]
    measured: tuple[int, ...] | None = None
    num_shared: int = 0

    def __post_init__(self) -> None:
        if self.measured is not None and len(self.measured) != len(self.expected):
            raise ValueError(f"ActivatedExperts.measured has {len(self.measured)} layers, "
                             f"expected {len(self.expected)}")

    @property
    def per_layer(self) -> tuple[float, ...]:
        """The counts the step's bytes are charged with: measured where recorded, else expected."""
        return tuple(float(m) for m in self.measured) if self.measured is not None \
            else self.expected

    @property
    def mean_expected(self) -> float:
        """Expected distinct routed experts, averaged over MoE layers."""
        return sum(self.expected) / len(self.expected) if self.expected else 0.0

    @property
    def mean_measured(self) -> float | None:
        """Measured distinct routed experts, averaged over MoE layers (None if not recorded)."""
        if self.measured is None:
            return None
        return sum(self.measured) / len(self.measured) if self.measured else 0.0


def activated_experts(spec: ModelSpec, num_tokens: int,
                      measured: Sequence[int] | None = None) -> ActivatedExperts:
    """The expected (and, if given, measured) distinct experts of `num_tokens` tokens in `spec`.

    Args:
        spec: The model.
        num_tokens: Tokens the step runs through every MoE layer.
        measured: Distinct routed experts the run used in each MoE layer, in `spec.moe_layers`
            order.

    Raises:
        ValueError: `measured` has the wrong length, or a count outside
            `0..min(num_experts, num_tokens * top_k)`.
    """
    moe = spec.moe
    one = expected_distinct_experts(moe.num_experts, moe.router.top_k, num_tokens)
    expected = (one,) * spec.num_moe_layers
    if measured is not None:
        measured = tuple(int(m) for m in measured)
        if len(measured) != spec.num_moe_layers:
            raise MoECapError(f"measured experts: {len(measured)} layers given, the model has "
                             f"{spec.num_moe_layers} MoE layers")
        ceiling = min(moe.num_experts, num_tokens * moe.router.top_k)
        bad = [m for m in measured if not 0 <= m <= ceiling]
        if bad:
            raise MoECapError(f"measured experts {bad} outside 0..{ceiling} for {num_tokens} "
                             f"tokens, {moe.num_experts} experts, top-{moe.router.top_k}")
    return ActivatedExperts(num_tokens, expected, measured, moe.num_shared_experts)


def count_distinct_experts(routing: Iterable[Iterable[int]]) -> tuple[int, ...]:
    """Distinct experts per layer from a routing record: `routing[l]` lists every expert id the
    step's tokens chose in MoE layer `l` (`T * k` ids, repeats allowed)."""
    return tuple(len(set(layer)) for layer in routing)
