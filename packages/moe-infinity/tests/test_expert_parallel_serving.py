"""The serving engine with its expert cache spread over several ranks (expert parallel), on the
CPU over gloo: `--gpus` errors in one line, two ranks' greedy tokens equal one process's, and
`moe-infinity serve --gpus cpu:2` answers and stops on SIGTERM with no process left behind."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import moe_core
import pytest
import torch
from moe_core import MoEForCausalLM
from moe_infinity.cli import app
from moe_infinity.errors import MoEInfinityError
from moe_infinity.serving import Engine, EngineSettings, GenerationRequest, build_engine
from moe_infinity.serving.rank_devices import parse_gpus
from moe_infinity.serving.rank_leader import RankLeader, while_ranks_run
from moe_infinity.serving.request import SequenceEvent
from typer.testing import CliRunner

_SCRIPT = Path(sys.executable).parent / "moe-infinity"
_EXPERT_BYTES = 491_520  # one float32 tiny-moe expert
PROMPTS = ["Once upon a time, there was a little fox who", "def fibonacci(n):",
           "Tom has 3 apples and buys 5 more. How many apples does he have now?"]


@pytest.mark.parametrize(("gpus", "device", "says"), [
    ("", "auto", "--gpus needs at least one GPU"),
    (" , ", "auto", "--gpus needs at least one GPU"),
    ("0,a", "auto", "--gpus takes comma-separated GPU indices"),
    ("-1", "auto", "--gpus takes comma-separated GPU indices"),
    ("0,1,0", "auto", "--gpus names GPU 0 more than once"),
    ("0,1", "cpu", "leave --device at auto"),
    ("cpu:0", "auto", "--gpus cpu:N needs a number of CPU ranks N >= 1"),
    ("cpu:2", "cuda", "cannot go with --device cuda"),
])
def test_bad_gpus_are_refused_in_one_line(gpus: str, device: str, says: str) -> None:
    with pytest.raises(moe_core.SettingError, match=re.escape(says)):
        parse_gpus(gpus, device)
    if device == "cuda" and not torch.cuda.is_available():
        return  # the command refuses --device cuda itself, first
    result = CliRunner().invoke(app, ["serve", "--port", "0", "--device", device,
                                      "--gpus", gpus])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and says in lines[0], result.output


def test_a_budget_mistake_is_one_line_before_any_rank_starts() -> None:
    result = CliRunner().invoke(app, ["serve", "--port", "0", "--device", "cpu", "--gpus",
                                      "cpu:2", "--gpu-memory", "1KiB"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1
    assert lines[-1].startswith("error: ") and "does not hold the model's dense weights" in \
        lines[-1] and not any(line.startswith("error: rank") for line in lines), result.output


def test_gpus_that_are_not_present_are_refused() -> None:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    says = "no CUDA GPU is available" if count == 0 else f"GPU {count} is not present"
    with pytest.raises(moe_core.SettingError, match=says):
        parse_gpus(f"{count}", "auto")
    assert parse_gpus("cpu:3", "auto") == ("cpu", "cpu", "cpu")


def test_a_rank_that_exits_while_starting_is_reported_at_once() -> None:
    """Rank 0 does not wait out torch.distributed's timeout for a rank that is gone."""
    rank = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    started = time.monotonic()
    with pytest.raises(MoEInfinityError, match=r"rank 1 exited \(status 3\) before it joined"):
        while_ranks_run([rank], lambda: time.sleep(60), "joined")
    assert time.monotonic() - started < 10
    assert while_ranks_run([], lambda: 7, "joined") == 7


def _tokens(engine: Engine, requests: list[GenerationRequest]) -> dict[str, list[int]]:
    """Submit every request at once; each one's output tokens, once all have finished."""
    events: queue.Queue[SequenceEvent] = queue.Queue()
    for request in requests:
        engine.submit(request, events.put)
    out: dict[str, list[int]] = {r.request_id: [] for r in requests}
    done = 0
    while done < len(requests):
        event = events.get(timeout=120)
        assert event.error is None, event.error
        out[event.request_id] += event.token_ids
        done += event.finish_reason is not None
    return out


def test_two_cpu_ranks_give_the_greedy_tokens_of_one_process(tiny: MoEForCausalLM) -> None:
    """Three prompts run together through the engine, prefilled 8 tokens per step, the experts
    split over two gloo ranks, each with 6 slots for its 48 experts: every greedy output equals
    `generate` of the prompt alone on the plain model (one process, every expert). Then rank 1
    is killed: the engine reports itself down and fails a new request instead of hanging."""
    spec = moe_core.ModelSpec.from_pretrained(moe_core.tiny_model_path())
    budget = spec.dense_bytes(torch.float32) + (8 << 20) + 6 * _EXPERT_BYTES
    settings = EngineSettings(model="tiny-moe", device="cpu", dtype=None,
                              gpu_memory_bytes=budget, kv_memory_bytes=8 << 20,
                              policy="activation", traces=None, save_every=0,
                              trace_capacity=100, max_batch=8, max_queue=16, prefill_chunk=8,
                              rank_devices=("cpu", "cpu"))
    engine = build_engine(settings)
    ranks = engine.followers
    assert isinstance(ranks, RankLeader)
    try:
        engine.start()
        tokenizer = engine.served.tokenizer
        requests = [GenerationRequest(request_id=str(i), prompt_ids=tuple(
            tokenizer(p)["input_ids"]), max_tokens=8) for i, p in enumerate(PROMPTS)]
        tokens = _tokens(engine, requests)
        assert engine.is_alive and ranks.exit_codes == [None]
        # A rank lost later: the engine says it is down (/health 503), requests fail at once.
        os.kill(ranks.pids[0], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while ranks.exit_codes == [None] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not engine.is_alive
        events: queue.Queue[SequenceEvent] = queue.Queue()
        engine.submit(GenerationRequest(request_id="late", prompt_ids=(5, 6), max_tokens=2),
                      events.put)
        last = events.get(timeout=60)
        assert last.finish_reason == "cancelled" and last.error is not None
    finally:
        engine.stop()
    assert ranks.exit_codes == [-signal.SIGKILL]
    runtime = engine.served.runtime
    assert runtime.store.experts() == ranks.plan.owned(0)  # rank 0 holds its shard only
    assert runtime.snapshot().evictions > 0  # and its cache was too small for it
    for request in requests:
        result = moe_core.generate(tiny, [list(request.prompt_ids)], max_new_tokens=8)
        assert tokens[request.request_id] == result.tokens[0, : result.lengths[0]].tolist()


def _children(pid: int) -> list[int]:
    """The processes `pid`'s threads started (Linux)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _running(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def test_serve_with_two_cpu_ranks_answers_and_stops_on_sigterm() -> None:
    command = ([str(_SCRIPT)] if _SCRIPT.exists()
               else [sys.executable, "-c", "from moe_infinity.cli import app; app()"])
    server = subprocess.Popen(
        [*command, "serve", "--port", "0", "--device", "cpu", "--gpus", "cpu:2",
         "--gpu-memory", "64MiB", "--kv-memory", "8MiB", "--grace", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"})
    children: list[int] = []
    try:
        assert server.stdout is not None
        line = server.stdout.readline()  # the ready line: every rank has loaded
        match = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        assert match, line + (server.stderr.read() if server.stderr else "")
        children = _children(server.pid)
        assert children  # rank 1 (and multiprocessing's resource tracker)
        url = f"http://127.0.0.1:{match.group(1)}"
        body = {"model": "tiny-moe", "prompt": "Once upon a time", "max_tokens": 6,
                "temperature": 0}
        answer = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["completion_tokens"] == 6
        assert httpx.get(f"{url}/health", timeout=10).json()["status"] == "ok"
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
        deadline = time.monotonic() + 10
        while any(_running(c) for c in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_running(c) for c in children)
    finally:
        for pid in [server.pid, *children]:  # nothing of this test outlives it
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
        server.wait()
    stderr = server.stderr.read() if server.stderr else ""
    assert "expert parallel: 2 ranks on cpu, cpu" in stderr and "stopped after 1 requests" in \
        stderr, stderr
