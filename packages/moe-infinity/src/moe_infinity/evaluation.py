"""The whole simulate run: build the collection from one part of a trace set, calibrate the
predictor on it, measure each predictor source, and replay the other part under every policy and
cache size."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from moe_core import SettingError

from moe_infinity.collection import TraceCollection
from moe_infinity.policy_setup import PolicySetup
from moe_infinity.predictor import PredictorConfig
from moe_infinity.simulator import (
    H200_PCIE_BYTES_PER_S,
    SimulationConfig,
    SimulationResult,
    simulate,
)
from moe_infinity.source_recall import SourceRecall, calibrated_config, measure_recall
from moe_infinity.trace import RequestTrace, TraceSet

__all__ = ["EvaluationPlan", "EvaluationReport", "evaluate"]


@dataclass(frozen=True, kw_only=True)
class EvaluationPlan:
    """What `evaluate` runs.

    Attributes:
        cache_fractions: Cache sizes, as shares of all routed experts.
        policies: Policy set-ups.
        build_share: Share of the requests (the first ones) that build the collection; the
            rest are replayed.
        capacity: Collection capacity (None: every build request fits).
        calibration_share: Share of the build requests held out of a first collection to
            calibrate the predictor's mixing weights.
        prefetch_budget: Experts prefetched per layer step (None: top-k).
        bandwidth_bytes_per_s: For the time estimate.
        predictor: Predictor settings (weights are replaced by the calibrated ones).
    """

    cache_fractions: tuple[float, ...] = (0.1, 0.25, 0.5)
    policies: tuple[PolicySetup, ...] = ()
    build_share: float = 0.5
    capacity: int | None = None
    calibration_share: float = 0.25
    prefetch_budget: int | None = None
    bandwidth_bytes_per_s: float = H200_PCIE_BYTES_PER_S
    predictor: PredictorConfig = field(default_factory=PredictorConfig)

    def __post_init__(self) -> None:
        if not self.cache_fractions or not self.policies:
            raise SettingError("give at least one cache fraction and one policy")
        for fraction in self.cache_fractions:  # validates the fractions and the budgets
            SimulationConfig(cache_fraction=fraction, prefetch_budget=self.prefetch_budget,
                             bandwidth_bytes_per_s=self.bandwidth_bytes_per_s)
        if not 0.0 < self.build_share < 1.0:
            raise SettingError(f"build share must be in (0, 1), got {self.build_share}")
        if not 0.0 < self.calibration_share < 1.0:
            raise SettingError(f"calibration share must be in (0, 1), got "
                               f"{self.calibration_share}")
        if self.capacity is not None and self.capacity <= 0:
            raise SettingError(f"collection capacity must be positive, got {self.capacity}")


@dataclass(frozen=True)
class EvaluationReport:
    """Everything `simulate` prints.

    Attributes:
        build_requests, eval_requests: How the trace set was split.
        predictor: The calibrated predictor settings.
        source_recall: Each source's recall at the prefetch budget on the replayed requests.
        prefetch_budget: The budget used.
        results: One result per (policy, cache fraction), policies in plan order.
        collection: The collection built from the build requests.
    """

    build_requests: int
    eval_requests: int
    predictor: PredictorConfig
    source_recall: list[SourceRecall]
    prefetch_budget: int
    results: list[SimulationResult]
    collection: TraceCollection


def _collection(traces: Sequence[RequestTrace], traceset: TraceSet,
                capacity: int | None) -> TraceCollection:
    collection = TraceCollection(traceset.shape, capacity or max(len(traces), 1))
    for trace in traces:
        if trace.eam.any():
            collection.add(trace.eam)
    return collection


def evaluate(traceset: TraceSet, plan: EvaluationPlan,
             on_result: Callable[[SimulationResult], None] | None = None) -> EvaluationReport:
    """Split, calibrate, measure and replay (see the module docstring).

    Raises:
        ValueError: a split that leaves a part empty.
    """
    build, replay = traceset.split(plan.build_share)
    budget = plan.prefetch_budget or traceset.shape.top_k
    cut = min(max(1, round(len(build) * (1 - plan.calibration_share))), len(build))
    predictor = plan.predictor
    if cut < len(build):
        first = _collection(build[:cut], traceset, plan.capacity)
        predictor = calibrated_config(build[cut:], first, plan.predictor, budget)
    collection = _collection(build, traceset, plan.capacity)
    recall = measure_recall(replay, collection, predictor, budget)
    results = []
    for setup in plan.policies:
        for fraction in plan.cache_fractions:
            config = SimulationConfig(cache_fraction=fraction, prefetch_budget=budget,
                                      bandwidth_bytes_per_s=plan.bandwidth_bytes_per_s,
                                      predictor=predictor)
            result = simulate(replay, traceset.shape, setup, config, collection)
            results.append(result)
            if on_result is not None:
                on_result(result)
    return EvaluationReport(len(build), len(replay), predictor, recall, budget, results,
                            collection)
