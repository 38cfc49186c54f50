"""The simulator's bookkeeping, policy names, and the whole evaluation on real traces."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from moe_infinity import (
    DEFAULT_POLICIES,
    EvaluationPlan,
    PolicySetup,
    SimulationConfig,
    TraceCollection,
    TraceSet,
    access_string,
    evaluate,
    parse_policies,
    simulate,
)

Synthetic = Callable[..., TraceSet]


@pytest.mark.parametrize("name", DEFAULT_POLICIES)
def test_counts_add_up(synthetic: Synthetic, name: str) -> None:
    traces = synthetic(3, num_requests=4)
    collection = TraceCollection(traces.shape, 2)
    collection.add(traces.traces[0].eam)
    result = simulate(traces.traces, traces.shape, PolicySetup.parse(name),
                      SimulationConfig(cache_fraction=0.3), collection)
    uses = access_string(traces.traces, traces.shape)
    assert result.accesses == result.hits + result.misses == len(uses)
    assert result.decode_accesses == sum(len(access_string([t], traces.shape))
                                         - len(t.experts_at(0, 0)) - len(t.experts_at(0, 1))
                                         - len(t.experts_at(0, 2)) for t in traces)
    assert 0 <= result.prefetches_used <= result.prefetches
    assert result.decode_tokens == sum(t.num_decode_tokens for t in traces)
    assert 0.0 <= result.hit_rate <= 1.0 and 0.0 <= result.prefetch_recall <= 1.0
    assert result.seconds_per_token == pytest.approx(result.bytes_per_token / 54.7e9)
    if "prefetch" not in name:
        assert result.prefetches == 0


def test_a_cache_holding_everything_only_misses_once(synthetic: Synthetic) -> None:
    traces = synthetic(5, num_requests=5)
    distinct = len(set(access_string(traces.traces, traces.shape)))
    for name in ("lru", "lfu", "aware", "belady"):
        result = simulate(traces.traces, traces.shape, PolicySetup.parse(name),
                          SimulationConfig(cache_fraction=1.0))
        assert result.misses == distinct, name


def test_policy_names() -> None:
    assert PolicySetup.parse("aware+prefetch-nolookahead") == PolicySetup(
        eviction="aware", prefetch=True, lookahead=False)
    assert PolicySetup.parse(" LRU ") == PolicySetup(eviction="lru")
    assert [p.name for p in parse_policies(",".join(DEFAULT_POLICIES))] == list(DEFAULT_POLICIES)
    for bad, message in [("fifo", "unknown eviction"), ("belady+prefetch", "does not prefetch"),
                         ("lru-nolookahead", "only applies"), ("lru+x", "expected"),
                         (",", "no policy")]:
        with pytest.raises(ValueError, match=message):
            parse_policies(bad)


def test_config_validation() -> None:
    for kwargs, message in [({"cache_fraction": 0.0}, "cache fraction"),
                            ({"cache_fraction": 0.5, "prefetch_budget": 0}, "prefetch budget"),
                            ({"cache_fraction": 0.5, "bandwidth_bytes_per_s": 0}, "bandwidth"),
                            ({"cache_fraction": 0.5, "prefetch_horizon": 0}, "horizon")]:
        with pytest.raises(ValueError, match=message):
            SimulationConfig(**kwargs)  # type: ignore[arg-type]


def test_evaluation_on_real_traces(sample_traces: TraceSet) -> None:
    plan = EvaluationPlan(cache_fractions=(0.25, 0.5),
                          policies=tuple(parse_policies("lru,aware+prefetch,belady")))
    report = evaluate(sample_traces, plan)
    assert (report.build_requests, report.eval_requests) == (14, 14)
    assert [r.policy for r in report.results] == ["lru", "lru", "aware+prefetch",
                                                  "aware+prefetch", "belady", "belady"]
    by = {(r.policy, r.cache_fraction): r for r in report.results}
    for fraction in (0.25, 0.5):
        assert by["lru", fraction].hits <= by["belady", fraction].hits
        assert by["aware+prefetch", fraction].prefetches > 0
    recall = {r.source: r for r in report.source_recall}
    assert set(recall) == {"trace", "lookahead", "own", "combined"}
    # Real routing: the lookahead foresees the next layer far better than chance (2 of 16).
    assert recall["lookahead"].recall > 0.5
    assert recall["lookahead"].coverage == pytest.approx(5 / 6)
    assert all(w > 0 for w in report.predictor.weights)
