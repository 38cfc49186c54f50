"""Workload files, synthetic workloads, length distributions, load patterns, SSE."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
from moe_cap.errors import WorkloadError
from moe_cap.latency_stats import Slo, goodput_count, percentiles
from moe_cap.length_distribution import parse_length
from moe_cap.load_pattern import LoadPattern, poisson_arrivals
from moe_cap.request_result import RequestResult
from moe_cap.sse import SseDecoder
from moe_cap.workload import SyntheticSpec, read_workload, synthetic_workload


def test_reads_prompts_and_chats(tmp_path: Path) -> None:
    path = tmp_path / "w.jsonl"
    path.write_text('{"prompt": "hi", "max_tokens": 5}\n\n'
                    '{"id": "c", "messages": [{"role": "user", "content": "yo"}]}\n')
    first, second = read_workload(path)
    assert (first.id, first.prompt, first.max_tokens) == ("line-1", "hi", 5)
    assert second.id == "c" and second.messages == ({"role": "user", "content": "yo"},)


def test_every_bad_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "w.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": 3}\n{oops\n{"prompt": "a", "max_tokens": 0}\n'
                    '{"prompt": "a", "colour": 1}\n{"id": "line-1", "prompt": "dup"}\n')
    with pytest.raises(WorkloadError) as caught:
        read_workload(path)
    message = str(caught.value)
    assert "5 bad line(s)" in message
    for n in (2, 3, 4, 5, 6):
        assert f"line {n}:" in message


def test_synthetic_lengths_follow_the_spec() -> None:
    spec = SyntheticSpec(50, parse_length("uniform:5:9", "--input-len"),
                         parse_length("7", "--output-len"), seed=3)
    items = synthetic_workload(spec)
    assert items == synthetic_workload(spec)  # seeded
    assert all(5 <= len((i.prompt or "").split()) <= 9 for i in items)
    assert {i.max_tokens for i in items} == {7} and all(i.ignore_eos for i in items)


@pytest.mark.parametrize("text", ["0", "uniform:9:5", "normal:abc:1", "gamma:1:2", ""])
def test_bad_lengths(text: str) -> None:
    with pytest.raises(WorkloadError, match="--input-len"):
        parse_length(text, "--input-len")


def test_poisson_arrivals_have_the_rate() -> None:
    times = list(itertools.islice(poisson_arrivals(4.0, seed=1), 4000))
    assert times == list(itertools.islice(poisson_arrivals(4.0, seed=1), 4000))
    assert times[-1] / len(times) == pytest.approx(0.25, rel=0.05)


@pytest.mark.parametrize(("kwargs", "option"), [
    ({"concurrency": 0}, "--concurrency"), ({"rate_per_s": -1.0}, "--rate"),
    ({"num_requests": 0}, "--requests"), ({"duration_s": 0.0}, "--duration")])
def test_bad_load(kwargs: dict[str, float], option: str) -> None:
    with pytest.raises(WorkloadError, match=option):
        LoadPattern(**kwargs)  # type: ignore[arg-type]


def test_sse_events() -> None:
    lines = [": comment", "data: {\"a\": 1}", "", "event: x", "data: line1", "data: line2", "",
             "data: [DONE]"]
    assert list(SseDecoder().events(lines)) == ['{"a": 1}', "line1\nline2", "[DONE]"]


def _row(ttft: float, e2e: float, tokens: int) -> RequestResult:
    return RequestResult("r", 0, 0.0, e2e, ttft, (), 1, tokens, "length")


def test_goodput_and_slo() -> None:
    rows = [_row(0.1, 1.1, 11),   # tpot 0.1
            _row(0.3, 0.8, 6),    # ttft too slow
            _row(0.1, 2.1, 11),   # tpot 0.2: too slow
            _row(0.1, 0.1, 1)]    # one token: no TPOT, meets it
    assert goodput_count(rows, Slo(ttft_s=0.2, tpot_s=0.15)) == 2
    assert goodput_count(rows, Slo(ttft_s=0.2)) == 3
    with pytest.raises(WorkloadError, match="--slo-ttft"):
        Slo(ttft_s=-1)


def test_percentiles_match_numpy_rule() -> None:
    rng = random.Random(0)
    values = [rng.random() for _ in range(101)]
    p = percentiles(values)
    assert p is not None and p.p50 == sorted(values)[50] and p.count == 101
    assert percentiles([]) is None
