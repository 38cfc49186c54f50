"""`moe-cap run` against a stub OpenAI-compatible server with scripted token timings: the
client's arithmetic (known delays give known TTFT and TPOT), the records, the load patterns."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from moe_cap.errors import TargetError
from moe_cap.latency_stats import Slo
from moe_cap.load_pattern import LoadPattern
from moe_cap.run_benchmark import RunConfig, ServerSpec, run_benchmark
from moe_cap.run_record import RunRecord
from moe_cap.target import GenerationSettings
from moe_cap.workload import WorkItem

sys.path.insert(0, str(Path(__file__).parent))
from stub_server import Script, StubServer

# Delays long enough that the loopback and event-loop overhead (a few ms, more on a busy CI
# machine) stays well inside the 5% the figures must match to.
TTFT, TPOT, TOKENS = 1.0, 0.1, 8
DATA = Path(__file__).parent / "data"


def _items(n: int, chat: bool = False) -> list[WorkItem]:
    if chat:
        return [WorkItem(f"c{i}", messages=({"role": "user", "content": "hello there"},),
                         max_tokens=TOKENS) for i in range(n)]
    return [WorkItem(f"r{i}", prompt="one two three four", max_tokens=TOKENS) for i in range(n)]


def test_known_delays_give_known_percentiles(tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    with StubServer(Script(ttft_s=TTFT, tpot_s=TPOT)) as server:
        outcome = run_benchmark(ServerSpec(server.url, "stub"), _items(8),
                                RunConfig(record_path=out, load=LoadPattern(concurrency=4),
                                          slo=Slo(ttft_s=2 * TTFT, tpot_s=2 * TPOT)))
    serving = outcome.record.serving
    assert serving is not None
    for key, want in (("ttft_s", TTFT), ("tpot_s", TPOT)):
        for q in ("p50", "p90", "mean"):
            assert getattr(serving.latencies[key], q) == pytest.approx(want, rel=0.05), (key, q)
    # Single gaps carry the scheduler's jitter: their median, not their tail, is the delay.
    assert serving.latencies["itl_s"].p50 == pytest.approx(TPOT, rel=0.05)
    assert serving.latencies["e2e_s"].p50 == pytest.approx(TTFT + (TOKENS - 1) * TPOT, rel=0.05)
    assert serving.latencies["itl_s"].count == 8 * (TOKENS - 1)
    # Two rounds of four clients: about twice one request's time.
    assert serving.duration_s == pytest.approx(2 * (TTFT + (TOKENS - 1) * TPOT), rel=0.15)
    assert serving.goodput_requests_per_s == pytest.approx(serving.requests_per_s)
    # The record on disk reads back whole and equal; the rows are all there.
    again = RunRecord.from_json(out)
    assert again == outcome.record
    assert (again.input_tokens, again.output_tokens) == (8 * 4, 8 * TOKENS)
    assert again.counters == {"moe_expert_hits_total": 4 * 8 * TOKENS,
                              "moe_h2d_bytes_total": 1000 * 8 * TOKENS}
    assert again.steps == () and again.energy_source == "tdp"
    rows = [json.loads(line) for line in (tmp_path / "run.requests.jsonl").read_text()
            .splitlines()]
    assert sorted(r["index"] for r in rows) == list(range(8))
    assert all(r["error"] is None and r["output_tokens"] == TOKENS for r in rows)


def test_chat_and_chunks_of_several_tokens(tmp_path: Path) -> None:
    with StubServer(Script(ttft_s=0.05, tpot_s=0.01, tokens_per_chunk=3)) as server:
        outcome = run_benchmark(ServerSpec(server.url, "stub"), _items(2, chat=True),
                                RunConfig(record_path=tmp_path / "r.json"))
        assert all("messages" in r for r in server.requests)
        assert all(r["stream"] is True for r in server.requests)
    # The server's usage counts the tokens, not the chunks.
    chunks = -(-TOKENS // 3)
    assert all(r.output_tokens == TOKENS and len(r.itl_s) == chunks - 1 for r in outcome.rows)


def test_open_loop_sends_at_poisson_times(tmp_path: Path) -> None:
    load = LoadPattern(concurrency=None, rate_per_s=20.0, num_requests=10, seed=5)
    with StubServer(Script(ttft_s=0.01, tpot_s=0.001)) as server:
        outcome = run_benchmark(ServerSpec(server.url, "stub"), _items(3),
                                RunConfig(record_path=tmp_path / "r.json", load=load))
    import itertools

    from moe_cap.load_pattern import poisson_arrivals

    want = list(itertools.islice(poisson_arrivals(20.0, 5), 10))
    got = [r.start_s for r in outcome.rows]
    assert [r.id for r in outcome.rows] == [f"r{i % 3}" for i in range(10)]  # cycled
    # Sent on schedule, give or take the event loop's lateness on a busy machine.
    assert got == pytest.approx(want, abs=0.1)
    assert got == sorted(got)


def test_duration_stops_sending(tmp_path: Path) -> None:
    load = LoadPattern(concurrency=2, duration_s=0.5)
    with StubServer(Script(ttft_s=0.05, tpot_s=0.005)) as server:
        outcome = run_benchmark(ServerSpec(server.url, "stub"), _items(1),
                                RunConfig(record_path=tmp_path / "r.json", load=load))
    # Each request takes ~0.1 s, two at a time, for ~0.5 s: about ten.
    assert 6 <= len(outcome.rows) <= 12
    assert max(r.start_s for r in outcome.rows) < 0.5


def test_failed_requests_are_rows_and_all_failed_is_an_error(tmp_path: Path) -> None:
    with StubServer(Script(status=500)) as server, \
            pytest.raises(TargetError, match=r"no request succeeded.*HTTP 500"):
        run_benchmark(ServerSpec(server.url, "stub"), _items(2),
                      RunConfig(record_path=tmp_path / "r.json"))
    rows = (tmp_path / "r.requests.jsonl").read_text().splitlines()
    assert len(rows) == 2 and "HTTP 500" in json.loads(rows[0])["error"]


def test_unreachable_server(tmp_path: Path) -> None:
    with pytest.raises(TargetError, match=r"cannot reach http://127\.0\.0\.1:9/v1"):
        run_benchmark(ServerSpec("http://127.0.0.1:9/v1", "x"), _items(1),
                      RunConfig(record_path=tmp_path / "r.json",
                                settings=GenerationSettings(max_tokens=4)))


def test_perplexity_and_choice_through_prompt_logprobs(tmp_path: Path) -> None:
    import math

    from moe_cap.scoring_run import ScoringConfig, run_scoring

    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i}" for i in range(25)))
    with StubServer() as server:
        spec = ServerSpec(server.url, "stub")
        ppl = run_scoring(spec, ScoringConfig(task="perplexity", data=text, seq_len=10,
                                              record_path=tmp_path / "p.json"))
        choice = run_scoring(spec, ScoringConfig(task="choice", data=DATA / "choice.jsonl",
                                                 record_path=tmp_path / "c.json"))
    assert ppl.accuracy is not None and ppl.accuracy.score == pytest.approx(math.e)
    assert ppl.accuracy.num_examples == 25 - 3  # three windows, each first word unscored
    assert ppl.steps == () and RunRecord.from_json(tmp_path / "p.json") == ppl
    # A choice costs -1 per word, so each question's choices tie and the first one is picked:
    # right in questions 1 and 4 of 4.
    assert choice.accuracy is not None and choice.accuracy.score == pytest.approx(0.5)


def test_server_without_prompt_logprobs(tmp_path: Path) -> None:
    from moe_cap.scoring_run import ScoringConfig, run_scoring

    text = tmp_path / "t.txt"
    text.write_text("a b c d e")
    with StubServer(Script(status=404)) as server, \
            pytest.raises(TargetError, match="returns no prompt log-probs"):
        run_scoring(ServerSpec(server.url, "stub"),
                    ScoringConfig(task="perplexity", data=text, seq_len=2,
                                  record_path=tmp_path / "p.json"))
