"""`moe-infinity serve` and `moe-infinity chat` as a user runs them: one-line errors before any
work, a server process stopped by SIGTERM in the middle of streams (exit 0, a valid trace
collection), and a chat session in the terminal."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import moe_core
import pytest
from moe_infinity import ModelShape, TraceCollection
from moe_infinity.cli import app
from typer.testing import CliRunner

_SCRIPT = Path(sys.executable).parent / "moe-infinity"


def _serve(*args: str) -> subprocess.Popen[str]:
    """`moe-infinity serve` of the tiny model on the CPU, on a free port, with `args` added."""
    command = ([str(_SCRIPT)] if _SCRIPT.exists()
               else [sys.executable, "-c", "from moe_infinity.cli import app; app()"])
    return subprocess.Popen(
        [*command, "serve", "--port", "0", "--device", "cpu", "--gpu-memory", "64MiB",
         "--grace", "1", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"})


def _ready_url(server: subprocess.Popen[str]) -> str:
    """The server's base URL, from its ready line (printed once the model is loaded)."""
    assert server.stdout is not None
    line = server.stdout.readline()
    match = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
    assert match, line + (server.stderr.read() if server.stderr else "")
    return f"http://127.0.0.1:{match.group(1)}"


def _one_error_line(result_output: str) -> str:
    lines = [line for line in result_output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result_output
    return lines[0]


@pytest.mark.parametrize(("args", "says"), [
    (["--policy", "fifo"], "--policy must be one of activation, lru, lfu"),
    (["--port", "70000"], "--port must be in 0..65535"),
    (["--gpu-memory", "lots"], "--gpu-memory"),
    (["--gpu-memory", "1KiB", "--device", "cpu"], "does not hold the model's dense weights"),
    (["--max-batch", "0", "--device", "cpu"], "--max-batch must be positive"),
    (["--grace", "-1"], "--grace must be >= 0"),
    (["--device", "tpu"], "tpu"),
    (["--prefetch", "bogus", "--device", "cpu"], "--prefetch must be none or lookahead"),
    (["--expert-dtype", "int4", "--device", "cpu"], "--expert-dtype must be fp8"),
    (["--prefill", "evict", "--device", "cpu"], "--prefill must be admit or stream"),
    (["--prefill", "stream", "--gpus", "cpu:2"], "--prefill stream is not supported with --gpus"),
])
def test_serve_refuses_bad_options_in_one_line(args: list[str], says: str) -> None:
    result = CliRunner().invoke(app, ["serve", "--port", "0", *args])
    assert result.exit_code == 1
    assert says in _one_error_line(result.output)


def test_serve_refuses_a_busy_port_and_a_corrupt_trace_file(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = CliRunner().invoke(app, ["serve", "--port", str(port), "--device", "cpu"])
    assert result.exit_code == 1
    assert f"cannot listen on 127.0.0.1:{port}" in _one_error_line(result.output)
    corrupt = tmp_path / "traces.bin"
    corrupt.write_bytes(b"not a trace collection")
    result = CliRunner().invoke(app, ["serve", "--port", "0", "--device", "cpu", "--traces",
                                      str(corrupt)])
    assert result.exit_code == 1
    assert str(corrupt) in _one_error_line(result.output)


def _stream(url: str, max_tokens: int, got: list[int]) -> None:
    """Stream a completion, counting data chunks into `got[0]`; a server that goes away ends
    it."""
    body = {"model": "tiny-moe", "prompt": "Once upon a time", "max_tokens": max_tokens,
            "stream": True, "ignore_eos": True, "temperature": 0}
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                got[0] += line.startswith("data: ")
    except httpx.HTTPError:
        pass


def test_sigterm_during_streams_exits_0_and_saves_the_traces(tmp_path: Path) -> None:
    traces = tmp_path / "traces.bin"
    server = _serve("--kv-memory", "32MiB", "--traces", str(traces), "--save-every", "1")
    try:
        url = _ready_url(server)
        short = httpx.post(f"{url}/v1/completions", timeout=60,
                           json={"model": "tiny-moe", "prompt": "Hi", "max_tokens": 3})
        assert short.status_code == 200
        deadline = time.monotonic() + 30
        while not traces.exists() and time.monotonic() < deadline:  # --save-every 1
            time.sleep(0.05)
        assert len(TraceCollection.load(traces)) == 1
        counts = [[0] for _ in range(3)]
        clients = [threading.Thread(target=_stream, args=(url, 900, c)) for c in counts]
        for client in clients:
            client.start()
        while min(c[0] for c in counts) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert min(c[0] for c in counts) >= 3  # every stream is under way
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
        for client in clients:
            client.join(timeout=30)
        assert max(c[0] for c in counts) < 900  # cut short by the grace period, not finished
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    stderr = server.stderr.read() if server.stderr else ""
    assert "stopped after 4 requests" in stderr, stderr
    spec = moe_core.ModelSpec.from_pretrained(moe_core.tiny_model_path())
    collection = TraceCollection.load(traces, expect=ModelShape.from_spec("tiny-moe", spec))
    assert len(collection) == 4  # the short request and the three cut streams
    assert not traces.with_name(traces.name + ".partial").exists()


def test_chat_answers_and_reports_speed_and_hit_rate() -> None:
    result = CliRunner().invoke(app, ["chat", "--device", "cpu", "--gpu-memory", "64MiB",
                                      "--kv-memory", "8MiB", "--max-tokens", "8",
                                      "--temperature", "0"],
                                input="How many apples?\nAnd pears?\n/exit\n")
    assert result.exit_code == 0, result.output
    summaries = re.findall(r"\[(\d+) tokens, [0-9.]+ tok/s, first token [0-9.]+ s, expert hit "
                           r"rate (?:[0-9.]+%|n/a)\]", result.output)
    assert len(summaries) == 2 and all(0 < int(n) <= 8 for n in summaries), result.output


def test_chat_refuses_a_bad_expert_dtype_in_one_line() -> None:
    result = CliRunner().invoke(app, ["chat", "--device", "cpu", "--expert-dtype", "e5m2"],
                                input="")
    assert result.exit_code == 1
    assert "--expert-dtype must be fp8" in _one_error_line(result.output)


def test_serve_with_fp8_experts_says_so_at_start_and_answers() -> None:
    """`--expert-dtype fp8` is never silent: the start-up line names it."""
    server = _serve("--kv-memory", "8MiB", "--expert-dtype", "fp8")
    try:
        answer = httpx.post(f"{_ready_url(server)}/v1/completions", timeout=60,
                            json={"model": "tiny-moe", "prompt": "Hi", "max_tokens": 3})
        assert answer.status_code == 200
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    stderr = " ".join((server.stderr.read() if server.stderr else "").split())  # unwrapped
    assert re.search(r"expert slots, policy \S+, experts fp8, fetch copy, prefill admit, ",
                     stderr), stderr


def test_chat_ends_cleanly_on_ctrl_d() -> None:
    result = CliRunner().invoke(app, ["chat", "--device", "cpu", "--gpu-memory", "64MiB",
                                      "--kv-memory", "8MiB"], input="")
    assert result.exit_code == 0, result.output
    assert "error" not in result.output and json.dumps("x")
