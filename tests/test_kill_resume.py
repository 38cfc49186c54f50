"""A moe-gen job killed at any moment, by SIGINT, SIGTERM or SIGKILL, and rerun each time, ends
with every request in its output exactly once, with the text an uninterrupted run gives.

Hypothesis picks the kills: how many results the run writes before it (0 or 1 more), how long
after that it lands (a share of an uninterrupted run's time, so that kills land mid-run on a fast
machine as on a slow one), and the signal. The job is the embedded tiny model on the CPU,
greedy, with ragged per-request token limits, so runs end with requests at every stage (queued,
prefilled, half decoded, written). Each run is a real process (the fork server of conftest.py).
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

if TYPE_CHECKING:
    from conftest import CliServer

LIMITS = (3, 6, 9, 12, 15, 18, 21, 24)  # ragged: results arrive one by one, short ones first
PROMPTS = ("Once upon a time", "The old fox", "def add(a, b):", "Tom has 3 apples",
           "Il était une fois", "The sea was", "Es war einmal", "A little cat")
OUTPUT = "out.jsonl"
ARGS = ("run", "--input", "requests.jsonl", "--output", OUTPUT, "--device", "cpu",
        "--ignore-eos", "--gpu-memory", "1GiB")
EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGKILL: -signal.SIGKILL}
MIN_INTERRUPTIONS = 20

Kill = tuple[signal.Signals, int, float]  # signal, results first, delay (share of a run)
kills = st.tuples(st.sampled_from(list(EXIT_STATUS)), st.integers(0, 1), st.floats(0.0, 0.4))


def write_requests(folder: Path) -> None:
    lines = [json.dumps({"id": f"r{i}", "prompt": p, "max_new_tokens": n})
             for i, (p, n) in enumerate(zip(PROMPTS, LIMITS, strict=True))]
    (folder / "requests.jsonl").write_text("\n".join(lines) + "\n")


def results(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def complete_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.fixture(scope="module")
def reference(cli: CliServer, tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[dict[str, object], float]:
    """Each request's text from one uninterrupted run, and how long the run took."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    write_requests(folder)
    started = time.monotonic()
    finished = cli.run("moe-gen", *ARGS, cwd=folder)
    assert finished.status == 0, finished.stderr
    return ({str(r["id"]): r["text"] for r in results(folder / OUTPUT)},
            time.monotonic() - started)


def interrupt(cli: CliServer, folder: Path, kill: Kill, run_s: float) -> bool:
    """One run of the job in `folder`, killed as `kill` says; whether the kill landed."""
    sig, more_results, delay = kill
    output = folder / OUTPUT
    before = complete_lines(output)
    running = cli.start("moe-gen", *ARGS, cwd=folder)
    cli.wait_until(lambda: not running.is_running()
                   or complete_lines(output) >= before + more_results)
    time.sleep(delay * run_s)
    landed = running.is_running()
    if landed:
        os.kill(running.pid, sig)
    finished = cli.wait(running)
    if not landed or finished.status == 0:  # it ended before the signal arrived
        assert finished.status == 0, finished.stderr
        return False
    if more_results or sig == signal.SIGKILL:
        assert finished.status == EXIT_STATUS[sig], finished.stderr
    else:  # may land before the command installs its handlers: the default action then
        assert finished.status in (EXIT_STATUS[sig], -sig, 130), finished.stderr
    if sig == signal.SIGINT and more_results:
        assert "interrupted: rerun the same command to resume" in finished.stderr
    return True


def test_killed_and_resumed_job_writes_every_request_once(
        cli: CliServer, reference: tuple[dict[str, object], float], tmp_path: Path) -> None:
    texts, run_s = reference
    landed: list[Kill] = []

    @settings(max_examples=12, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(kills, min_size=2, max_size=4))
    def killed_then_finished(plan: list[Kill]) -> None:
        folder = Path(tempfile.mkdtemp(dir=tmp_path))
        write_requests(folder)
        landed.extend(kill for kill in plan if interrupt(cli, folder, kill, run_s))
        finished = cli.run("moe-gen", *ARGS, cwd=folder)
        assert finished.status == 0, finished.stderr
        out = results(folder / OUTPUT)
        assert sorted(str(r["id"]) for r in out) == sorted(texts)  # each id exactly once
        assert {str(r["id"]): r["text"] for r in out} == texts

    killed_then_finished()
    assert len(landed) >= MIN_INTERRUPTIONS, f"only {len(landed)} kills landed mid-run"
    assert {sig for sig, _, _ in landed} == set(EXIT_STATUS)
