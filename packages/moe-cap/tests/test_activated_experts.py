"""Expected distinct experts under uniform top-k routing, and measured counts."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st
from moe_cap import activated_experts, count_distinct_experts, expected_distinct_experts
from moe_core import ModelSpec

routing = st.integers(1, 256).flatmap(lambda e: st.tuples(st.just(e), st.integers(1, e)))


def test_examples() -> None:
    assert expected_distinct_experts(8, 2, 0) == 0
    assert expected_distinct_experts(8, 2, 1) == 2  # one token: exactly k
    assert expected_distinct_experts(8, 2, 2) == pytest.approx(8 * (1 - 0.75**2))  # 3.5
    assert expected_distinct_experts(8, 8, 5) == 8  # k = E: all of them
    assert expected_distinct_experts(256, 8, 10**6) == pytest.approx(256)


@given(routing, st.integers(0, 5000))
def test_monotone_in_tokens_and_bounded(ek: tuple[int, int], tokens: int) -> None:
    e, k = ek
    now, more = expected_distinct_experts(e, k, tokens), expected_distinct_experts(e, k, tokens + 1)
    assert 0 <= now <= more <= e + 1e-9
    assert now <= tokens * k + 1e-9  # never more experts than choices made
    if tokens:
        assert now >= k - 1e-9  # at least one token's k distinct experts


def test_matches_simulated_routing() -> None:
    # 128 experts, top-8, 16 tokens: average distinct count over 2000 simulated batches.
    rng = random.Random(0)
    runs = [len({x for _ in range(16) for x in rng.sample(range(128), 8)}) for _ in range(2000)]
    assert sum(runs) / len(runs) == pytest.approx(expected_distinct_experts(128, 8, 16), rel=0.01)


def test_bad_arguments() -> None:
    for args in ((0, 1, 1), (4, 5, 1), (4, 2, -1)):
        with pytest.raises(ValueError):
            expected_distinct_experts(*args)


def test_per_model_with_measurement(dsv3: ModelSpec) -> None:
    a = activated_experts(dsv3, 4, measured=[20] * 58)
    assert len(a.expected) == 58  # MoE layers only, not the 3 dense ones
    assert a.mean_expected == pytest.approx(256 * (1 - (1 - 8 / 256) ** 4))
    assert a.mean_measured == 20 and a.per_layer == (20.0,) * 58
    assert a.num_shared == 1
    with pytest.raises(ValueError, match=r"0\.\.32"):  # 4 tokens x top-8 choose at most 32
        activated_experts(dsv3, 4, measured=[33] * 58)


def test_count_distinct_from_routing_record() -> None:
    assert count_distinct_experts([[0, 1, 1, 3], [2, 2], []]) == (3, 1, 0)
