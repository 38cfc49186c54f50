"""The predictor: layer distances, the decay, each source's shares, and recall measurement."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from moe_infinity import (
    PredictorConfig,
    RequestPredictor,
    TraceCollection,
    TraceSet,
    measure_recall,
)
from moe_infinity.predictor import layer_distance, row_shares

Synthetic = Callable[..., TraceSet]


def test_layer_distance() -> None:
    np.testing.assert_array_equal(layer_distance(4, 1), [3, 4, 1, 2])
    np.testing.assert_array_equal(layer_distance(3, 2), [1, 2, 3])


def test_row_shares_leave_zero_rows() -> None:
    np.testing.assert_allclose(row_shares(np.array([[1, 3], [0, 0]])), [[0.25, 0.75], [0, 0]])


def test_need_mixes_sources_and_decays_with_distance(synthetic: Synthetic) -> None:
    traces = synthetic(0, num_requests=3, num_layers=3)
    collection = TraceCollection(traces.shape, 4)
    for t in traces:
        collection.add(t.eam)
    config = PredictorConfig(layer_decay=0.5)
    predictor = RequestPredictor(collection, config)
    trace = traces.traces[0]
    predictor.observe(0, 0, trace.step_counts[0, 0])
    look = np.zeros(traces.shape.num_experts, dtype=np.float32)
    look[4] = 1.0
    need = predictor.need(0, look)
    shares = predictor.source_shares(0, look)
    assert set(shares) == {"trace", "lookahead", "own"}
    np.testing.assert_allclose(need.sum(axis=1), [0.25, 1.0, 0.5], rtol=1e-5)  # decay by distance
    only_trace = RequestPredictor(collection, PredictorConfig(sources=("trace",)))
    assert set(only_trace.source_shares(0, look)) == {"trace"}


def test_recall_of_a_perfect_lookahead(synthetic: Synthetic) -> None:
    traces = synthetic(1, num_requests=4, num_layers=3, num_experts=6, top_k=2)
    collection = TraceCollection(traces.shape, 4)
    collection.add(traces.traces[0].eam)
    recall = {r.source: r for r in measure_recall(traces.traces, collection,
                                                  PredictorConfig(), budget=2)}
    # The synthetic lookahead is the next layer's true counts plus noise below 1: exact.
    assert recall["lookahead"].recall == pytest.approx(1.0)
    assert 0.0 <= recall["trace"].recall <= 1.0
    assert recall["combined"].coverage == pytest.approx(1.0)


def test_config_validation() -> None:
    for kwargs, message in [({"sources": ("magic",)}, "sources"),
                            ({"weights": (1.0, -1.0, 1.0)}, "weights"),
                            ({"num_matches": 0}, "num_matches"),
                            ({"layer_decay": 0.0}, "layer_decay"),
                            ({"own_decay": 1.5}, "own_decay")]:
        with pytest.raises(ValueError, match=message):
            PredictorConfig(**kwargs)  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 3), st.lists(st.integers(0, 9), min_size=2, max_size=6), st.data())
def test_a_step_observed_at_once_predicts_what_its_layers_in_turn_do(
        synthetic: Synthetic, seed: int, steps: list[int], data: st.DataObject) -> None:
    """`observe_step` over a prefill and decode steps leaves the predictor exactly where
    `observe` of each layer leaves it (the same bits of every source's shares and need)."""
    traces = synthetic(seed, num_requests=3, num_layers=3, num_experts=6)
    collection = TraceCollection(traces.shape, 4)
    for t in traces:
        collection.add(t.eam)
    by_layer, at_once = (RequestPredictor(collection, PredictorConfig()) for _ in range(2))
    prefill = True
    for index, tokens in enumerate(steps):
        step = 0 if prefill else index
        counts = data.draw(arrays(np.int32, (3, 6), elements=st.integers(0, tokens)))
        for layer in range(3):
            by_layer.observe(step, layer, counts[layer])
        at_once.observe_step(step, counts)
        prefill = prefill and data.draw(st.booleans())  # prefill chunks, then decode steps
        for layer in range(3):
            np.testing.assert_array_equal(at_once.need(layer, None), by_layer.need(layer, None))
        for name, shares in by_layer.source_shares(0, None).items():
            np.testing.assert_array_equal(at_once.source_shares(0, None)[name], shares)
