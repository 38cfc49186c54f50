"""What the activation-aware policy is told after every engine step: the running requests'
predicted need of each expert.

Dimension key: L MoE layers, E routed experts.

Each running request has a `RequestPredictor` over the server's trace collection; after every
pass the request's routing of that pass is observed layer by layer, and the policy receives the
mean of the running requests' need as seen from the end of a step (the next step starts at
layer 0). This is step-granular: within a step the policy's view does not change, which is what
an engine without a prefetcher can act on (issue 15 brings the per-layer prefetcher).
"""

from __future__ import annotations

import numpy as np

from moe_infinity.collection import TraceCollection
from moe_infinity.policies import ActivationAwarePolicy
from moe_infinity.predictor import PredictorConfig, RequestPredictor

__all__ = ["ActivationFeed"]


class ActivationFeed:
    """Predictors of the running requests, and the policy they feed."""

    def __init__(self, policy: ActivationAwarePolicy, collection: TraceCollection,
                 config: PredictorConfig | None = None) -> None:
        self.policy = policy
        self.collection = collection
        # The lookahead is per layer within a step; this feed works per step, so it is left out.
        self.config = config or PredictorConfig(sources=("trace", "own"))
        self._predictors: dict[str, RequestPredictor] = {}
        self._steps: dict[str, int] = {}

    def observe(self, request_id: str, counts: np.ndarray, prefill: bool) -> None:
        """A request's routing `[L, E]` in one pass (a prefill chunk or a decode step)."""
        predictor = self._predictors.get(request_id)
        if predictor is None:
            predictor = self._predictors[request_id] = RequestPredictor(self.collection,
                                                                        self.config)
            self._steps[request_id] = 0
        if not prefill:
            self._steps[request_id] += 1
        predictor.observe_step(self._steps[request_id], counts)

    def forget(self, request_id: str) -> None:
        """The request ended."""
        self._predictors.pop(request_id, None)
        self._steps.pop(request_id, None)

    def refresh(self) -> None:
        """Hand the policy the running requests' mean need (the collection's average when none
        runs)."""
        if not self._predictors:
            return
        last = self.collection.shape.num_moe_layers - 1
        needs = [p.need(last, None) for p in self._predictors.values()]
        self.policy.update(np.mean(needs, axis=0).astype(np.float32))
