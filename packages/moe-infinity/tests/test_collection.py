"""The trace collection: bounded, vectorised matching equals a plain loop, the most similar
entry is replaced when full, save/load round trips."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from moe_infinity import ModelShape, TraceCollection

SHAPE = ModelShape("synthetic", (0, 1, 2), 5, 2, 1000)
EAM = arrays(np.int64, (3, 5), elements=st.integers(0, 6)).filter(lambda a: a.any())


def _naive_similarity(query: np.ndarray, stored: np.ndarray) -> float:
    """Mean over the query's non-zero layers of the cosine of the two rows."""
    cosines = []
    for q, s in zip(query.astype(float), stored.astype(float), strict=True):
        if not q.any():
            continue
        cosines.append(0.0 if not s.any() else q @ s / np.linalg.norm(q) / np.linalg.norm(s))
    return float(np.mean(cosines)) if cosines else 0.0


@settings(max_examples=60, deadline=None)
@given(st.lists(EAM, min_size=1, max_size=12), st.integers(1, 5), EAM)
def test_size_bounded_and_matching_equals_a_plain_loop(eams: list[np.ndarray], capacity: int,
                                                       query: np.ndarray) -> None:
    collection = TraceCollection(SHAPE, capacity)
    for i, eam in enumerate(eams):
        collection.add(eam)
        assert len(collection) == min(i + 1, capacity)
    sims = collection.similarities(query)
    want = [_naive_similarity(query, stored) for stored in collection.counts]
    np.testing.assert_allclose(sims, want, rtol=1e-5, atol=1e-6)
    match = collection.match(query, top=3)
    assert len(match.indices) == min(3, len(collection))
    assert np.all(np.diff(match.similarities) <= 1e-7)  # best first
    assert match.similarities[0] == pytest.approx(max(want), abs=1e-6)


@settings(max_examples=60, deadline=None)
@given(st.lists(EAM, min_size=3, max_size=3), EAM)
def test_full_collection_replaces_the_most_similar(eams: list[np.ndarray],
                                                   new: np.ndarray) -> None:
    collection = TraceCollection(SHAPE, 3)
    for eam in eams:
        collection.add(eam)
    before = collection.counts.copy()
    sims = collection.similarities(new)
    slot = collection.add(new)
    assert sims[slot] == pytest.approx(sims.max(), abs=1e-6)
    after = collection.counts
    np.testing.assert_array_equal(after[slot], new)
    others = [i for i in range(3) if i != slot]
    np.testing.assert_array_equal(after[others], before[others])


@settings(max_examples=40, deadline=None)
@given(EAM, st.integers(1, 50))
def test_similarity_ignores_scale_and_finds_itself(eam: np.ndarray, scale: int) -> None:
    collection = TraceCollection(SHAPE, 4)
    collection.add(eam)
    assert collection.similarities(eam * scale)[0] == pytest.approx(1.0, abs=1e-5)


def test_partial_query_counts_only_observed_layers() -> None:
    collection = TraceCollection(SHAPE, 2)
    a = np.array([[4, 0, 0, 0, 0], [0, 4, 0, 0, 0], [0, 0, 4, 0, 0]])
    b = np.array([[4, 0, 0, 0, 0], [0, 0, 0, 0, 4], [0, 0, 0, 4, 0]])
    collection.add(a)
    collection.add(b)
    first_layer = np.zeros((3, 5))
    first_layer[0, 0] = 1
    np.testing.assert_allclose(collection.similarities(first_layer), [1.0, 1.0])
    two_layers = first_layer.copy()
    two_layers[1, 1] = 3
    assert collection.match(two_layers).indices[0] == 0
    np.testing.assert_allclose(collection.similarities(two_layers), [1.0, 0.5])
    assert not collection.similarities(np.zeros((3, 5))).any()


def test_bad_input_is_refused() -> None:
    collection = TraceCollection(SHAPE, 2)
    with pytest.raises(ValueError, match="EAM must be"):
        collection.add(np.ones((2, 5)))
    with pytest.raises(ValueError, match="negative"):
        collection.add(-np.ones((3, 5)))
    with pytest.raises(ValueError, match="all-zero"):
        collection.add(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="capacity"):
        TraceCollection(SHAPE, 0)
    with pytest.raises(ValueError, match="top"):
        collection.match(np.ones((3, 5)), top=0)


def test_empty_collection_matches_nothing() -> None:
    collection = TraceCollection(SHAPE, 2)
    assert len(collection.match(np.ones((3, 5))).indices) == 0
    assert not collection.mean_distribution().any()
