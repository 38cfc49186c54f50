"""`moe-infinity serve`'s HTTP front end on a loopback port, driven by the official `openai`
client and by raw HTTP: OpenAI compatibility, greedy output equal to `moe_core.generate`,
fuzzed bad input (never a 5xx), 64 concurrent streams, disconnects, 401 and 429."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import moe_core
import openai
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from moe_core import MoEForCausalLM
from moe_infinity.serving.app import create_app
from moe_infinity.serving.engine import Engine
from moe_infinity.serving.engine_config import EngineConfig
from moe_infinity.serving.request import GenerationRequest
from moe_infinity.serving.serving_metrics import ServingMetrics
from moe_infinity.serving.serving_model import ServingModel, load_serving_model
from moe_infinity.serving.trace_keeper import TraceKeeper

MODEL = "tiny-moe"
STORY = "Once upon a time, there was a little fox who"
QUESTION = "Tom has 3 apples and buys 5 more. How many apples does he have now?"


@dataclass
class Server:
    url: str
    process: subprocess.Popen[str]


@pytest.fixture(scope="module")
def served() -> ServingModel:
    """The model in this process (for the engine that never runs, and the tokenizer)."""
    return load_serving_model(MODEL, "cpu", moe_core.parse_bytes("64MiB"), "activation",
                              max_batch=64, kv_bytes=4 << 20)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`moe-infinity serve` as a user starts it: its own process, 127.0.0.1, a free port (the
    ready line names it), stopped with SIGTERM."""
    script = Path(sys.executable).parent / "moe-infinity"
    command = ([str(script)] if script.exists()
               else [sys.executable, "-c", "from moe_infinity.cli import app; app()"])
    log = tmp_path_factory.mktemp("server") / "stderr.log"
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [*command, "serve", "--port", "0", "--device", "cpu", "--gpu-memory", "128MiB",
             "--kv-memory", "48MiB", "--max-batch", "64", "--policy", "activation"],
            stdout=subprocess.PIPE, stderr=stderr, text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert process.stdout is not None
    line = process.stdout.readline()
    match = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
    assert match, line + log.read_text()
    try:
        yield Server(f"http://127.0.0.1:{match.group(1)}", process)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            assert process.wait(timeout=60) == 0, log.read_text()
        finally:
            if process.poll() is None:
                process.kill()


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                         timeout=120)


def _greedy(tiny: MoEForCausalLM, served: ServingModel, ids: list[int], n: int) -> str:
    """`moe_core.generate`'s greedy text on the plain (not offloaded) model, in this process."""
    result = moe_core.generate(tiny, [ids], max_new_tokens=n)
    return served.decode(result.tokens[0, : result.lengths[0]].tolist())


def _chat_ids(served: ServingModel, text: str) -> list[int]:
    return moe_core.render_chat(served.tokenizer, [{"role": "user", "content": text}])


def _is_openai_error(body: object) -> bool:
    if not isinstance(body, dict) or set(body) != {"error"} or not isinstance(body["error"],
                                                                              dict):
        return False
    error = body["error"]
    return (set(error) == {"message", "type", "param", "code"}
            and isinstance(error["message"], str) and bool(error["message"])
            and isinstance(error["type"], str)
            and (error["param"] is None or isinstance(error["param"], str))
            and (error["code"] is None or isinstance(error["code"], str)))


# The openai client ------------------------------------------------------------------------------

def test_openai_client_completions_equal_generate(client: openai.OpenAI, served: ServingModel,
                                                  tiny: MoEForCausalLM) -> None:
    expected = _greedy(tiny, served, served.tokenizer(STORY)["input_ids"], 24)
    whole = client.completions.create(model=MODEL, prompt=STORY, max_tokens=24, temperature=0)
    assert whole.choices[0].text == expected
    assert whole.usage is not None and whole.usage.completion_tokens <= 24
    chunks = list(client.completions.create(model=MODEL, prompt=STORY, max_tokens=24,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_openai_client_chat_equals_generate(client: openai.OpenAI, served: ServingModel,
                                           tiny: MoEForCausalLM) -> None:
    expected = _greedy(tiny, served, _chat_ids(served, QUESTION), 32)
    messages = [{"role": "user", "content": QUESTION}]
    whole = client.chat.completions.create(model=MODEL, messages=messages,  # type: ignore[arg-type]
                                           max_completion_tokens=32, temperature=0)
    assert whole.choices[0].message.content == expected
    assert whole.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model=MODEL, messages=messages,  # type: ignore[arg-type]
                                            max_tokens=32, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == len(_chat_ids(served, QUESTION))
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]


def test_models_logprobs_and_stop(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    out = client.completions.create(model=MODEL, prompt=STORY, max_tokens=6, temperature=0,
                                    logprobs=2, extra_body={"ignore_eos": True})
    logprobs = out.choices[0].logprobs
    assert logprobs is not None and len(logprobs.tokens or []) == 6
    assert all(len(t) == 2 for t in logprobs.top_logprobs or [])
    assert all(lp is not None and lp <= 0 for lp in logprobs.token_logprobs or [])
    # Greedy: the chosen token is the most likely one.
    assert logprobs.token_logprobs[0] == max(logprobs.top_logprobs[0].values())  # type: ignore[index]
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=4, temperature=0, logprobs=True,
                                          top_logprobs=3)
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content and all(len(e.top_logprobs) == 3 for e in content)
    full = client.completions.create(model=MODEL, prompt=STORY, max_tokens=24, temperature=0)
    word = full.choices[0].text.split()[3]
    cut = client.completions.create(model=MODEL, prompt=STORY, max_tokens=24, temperature=0,
                                    stop=[word])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == full.choices[0].text[: full.choices[0].text.find(word)]


def test_refusals_through_the_client(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client.completions.create(model=MODEL, prompt="a", max_tokens=2, n=2)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="word " * 1100, max_tokens=2)
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model=MODEL, prompt="a", max_tokens=1024)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt="a", max_tokens=2)


def test_a_vanishing_temperature_is_greedy(served: ServingModel) -> None:
    """5e-324 would divide the logits into inf and NaN (Hypothesis found it): it is greedy."""
    from moe_infinity.serving.openai_schema import CompletionBody
    from moe_infinity.serving.request_builder import RequestLimits, completion_request

    body = CompletionBody.model_validate({"model": MODEL, "prompt": "a", "temperature": 5e-324})
    request = completion_request(body, "r", served.tokenizer, RequestLimits(4096, 1024, 1024))
    assert request.sampling.is_greedy


# Fuzzed bodies -----------------------------------------------------------------------------------

_JUNK = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                  st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
                  st.lists(st.integers(-5, 5000), max_size=5),
                  st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))
_SMALL_TOKENS = st.one_of(st.integers(-3, 3), st.integers(2**20, 2**80), _JUNK)
_FIELDS = {
    "model": st.one_of(st.just(MODEL), _JUNK),
    "prompt": st.one_of(st.text(max_size=40), st.lists(st.integers(-3, 5000), max_size=8),
                        st.lists(st.text(max_size=8), max_size=3), _JUNK),
    "messages": st.one_of(
        st.lists(st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "system", "assistant", "tool", "bogus"]),
             "content": st.one_of(st.text(max_size=30), _JUNK,
                                  st.lists(st.fixed_dictionaries(
                                      {"type": st.sampled_from(["text", "image_url"]),
                                       "text": st.text(max_size=8)}), max_size=2))}),
            max_size=3), _JUNK),
    "max_tokens": _SMALL_TOKENS, "max_completion_tokens": _SMALL_TOKENS,
    "temperature": st.one_of(st.floats(-1, 3), _JUNK), "top_p": st.one_of(st.floats(-1, 2), _JUNK),
    "top_k": st.one_of(st.integers(-3, 10**12), _JUNK), "seed": st.one_of(st.integers(-(2**70),
                                                                                      2**70),
                                                                         _JUNK),
    "stop": st.one_of(st.text(max_size=4), st.lists(st.text(max_size=4), max_size=20), _JUNK),
    "n": st.one_of(st.integers(-2, 4), _JUNK), "stream": st.one_of(st.booleans(), _JUNK),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), _JUNK),
    "logprobs": st.one_of(st.integers(-2, 30), st.booleans(), _JUNK),
    "top_logprobs": st.one_of(st.integers(-2, 30), _JUNK),
    "echo": _JUNK, "suffix": _JUNK, "best_of": _JUNK, "ignore_eos": _JUNK,
}
_JSON_BODY = st.fixed_dictionaries({}, optional=_FIELDS).map(
    lambda d: json.dumps(d, allow_nan=True).encode())
_RAW_BODY = st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode),
                      st.just(b"{" * 5000), st.just(b"[" * 100_000 + b"]" * 100_000),
                      st.just(b'{"model": "tiny-moe", "prompt": "a"'), st.just(b"null"),
                      st.just(b"[]"), st.just(b'"text"'))
_VALID = {
    "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "top_k": st.integers(-1, 10**9),
    "seed": st.integers(0, 2**63), "stop": st.one_of(st.text(max_size=3),
                                                      st.lists(st.text(max_size=3), max_size=4)),
    "stream": st.booleans(), "ignore_eos": st.booleans(), "n": st.just(1),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
}
_MESSAGES = st.lists(st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system"]), "content": st.text(min_size=1, max_size=30)}),
    min_size=1, max_size=2).map(lambda m: [*m[:-1], {"role": "user", "content": m[-1]["content"]}])
_COMPLETION = st.fixed_dictionaries(
    {"model": st.just(MODEL), "max_tokens": st.integers(1, 3),
     "prompt": st.one_of(st.text(max_size=30), st.lists(st.integers(0, 4095), min_size=1,
                                                         max_size=8))},
    optional={**_VALID, "logprobs": st.integers(0, 5)})
_CHAT = st.fixed_dictionaries(
    {"model": st.just(MODEL), "max_completion_tokens": st.integers(1, 3), "messages": _MESSAGES},
    optional={**_VALID, "logprobs": st.booleans(), "top_logprobs": st.integers(0, 5)})


@st.composite
def _near_valid(draw: st.DrawFn) -> bytes:
    """A valid body (completions or chat), sometimes with one field replaced by junk."""
    body = dict(draw(st.one_of(_COMPLETION, _CHAT)))
    if draw(st.booleans()):
        body[draw(st.sampled_from(sorted(_FIELDS)))] = draw(_JUNK)
    return json.dumps(body, allow_nan=True).encode()


_CONTENT_TYPES = st.sampled_from(["application/json", "application/json; charset=utf-8",
                                  "text/plain", "application/x-www-form-urlencoded", "",
                                  "multipart/form-data", "APPLICATION/JSON"])
_TRIED: list[int] = []


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
       body=st.one_of(_near_valid(), _near_valid(), _JSON_BODY, _RAW_BODY),
       content_type=st.one_of(st.just("application/json"), _CONTENT_TYPES),
       method=st.sampled_from(["POST", "POST", "POST", "GET", "PUT"]))
def test_fuzzed_requests_never_get_a_server_error(server: Server, path: str, body: bytes,
                                                  content_type: str, method: str) -> None:
    headers = {"content-type": content_type} if content_type else {}
    with httpx.Client(base_url=server.url, timeout=60) as http:
        response = http.request(method, path, content=body, headers=headers)
        text = response.read()
    _TRIED.append(response.status_code)
    assert response.status_code < 500, text
    if response.status_code >= 400:
        assert _is_openai_error(json.loads(text)), text
    elif response.headers["content-type"].startswith("text/event-stream"):
        assert text.endswith(b"data: [DONE]\n\n")
    else:
        assert json.loads(text)["choices"]


def test_fuzz_figure() -> None:
    """How many fuzzed requests the test above sent (it runs first, in file order)."""
    statuses = sorted(set(_TRIED))
    print(f"\nfuzzed requests: {len(_TRIED)}, statuses {statuses}, "
          f"{sum(s < 300 for s in _TRIED)} accepted")
    assert len(_TRIED) >= 300 and all(s < 500 for s in _TRIED)


# Load, disconnects ------------------------------------------------------------------------------

async def _stream_one(http: httpx.AsyncClient, prompt: str, max_tokens: int
                      ) -> tuple[str, int, int]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    text, chunks, usage = "", 0, -1
    async with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data["choices"]:
                text += data["choices"][0]["text"]
                chunks += 1
            else:
                usage = data["usage"]["completion_tokens"]
    return text, chunks, usage


def test_64_concurrent_streams_complete_while_health_stays_fast(server: Server,
                                                                client: openai.OpenAI) -> None:
    prompts = [STORY, QUESTION, "def fibonacci(n):", "Il était une fois"]
    expected = {p: client.completions.create(model=MODEL, prompt=p, max_tokens=12,
                                             temperature=0, extra_body={"ignore_eos": True}
                                             ).choices[0].text for p in prompts}

    health: list[float] = []
    done = threading.Event()

    def poll() -> None:  # its own thread and connection, not the clients' event loop
        with httpx.Client(base_url=server.url, timeout=5) as http:
            while not done.is_set():
                started = time.perf_counter()
                assert http.get("/health").status_code == 200
                health.append(time.perf_counter() - started)
                time.sleep(0.05)

    async def main() -> list[tuple[str, int, int]]:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as http:
            return list(await asyncio.gather(*(_stream_one(http, prompts[i % 4], 12)
                                               for i in range(64))))

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        results = asyncio.run(main())
    finally:
        done.set()
        poller.join()
    assert len(results) == 64
    for i, (text, chunks, usage) in enumerate(results):
        assert usage == 12 and 1 <= chunks <= 12
        assert text == expected[prompts[i % 4]]
    print(f"\n/health: {len(health)} probes, max {max(health):.3f} s")
    assert health and max(health) < 1.0


def _metric(server: Server, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=5).text
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_disconnected_stream_is_cancelled_and_its_slot_freed(server: Server) -> None:
    cancelled = 'moe_infinity_requests_finished_total{reason="cancelled"}'
    before = _metric(server, cancelled)
    body = {"model": MODEL, "prompt": STORY, "max_tokens": 900, "stream": True,
            "ignore_eos": True}
    with httpx.Client(base_url=server.url, timeout=60) as http, \
            http.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        seen = 0
        while seen < 3:
            seen += next(lines).startswith("data: ")
        assert _metric(server, "moe_infinity_running_requests") == 1
        assert _metric(server, "moe_infinity_kv_blocks_used") > 0
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _metric(server, cancelled) < before + 1:
        time.sleep(0.05)
    assert _metric(server, cancelled) == before + 1
    while time.monotonic() < deadline and _metric(server, "moe_infinity_running_requests"):
        time.sleep(0.05)
    assert _metric(server, "moe_infinity_running_requests") == 0
    assert _metric(server, "moe_infinity_kv_blocks_used") == 0


def test_metrics_expose_latencies_tokens_and_the_offload_runtime(server: Server) -> None:
    response = httpx.post(f"{server.url}/v1/completions", timeout=60,
                          json={"model": MODEL, "prompt": STORY, "max_tokens": 4})
    assert response.status_code == 200
    deadline = time.monotonic() + 10
    while _metric(server, "moe_infinity_running_requests") and time.monotonic() < deadline:
        time.sleep(0.01)
    for name in ("moe_infinity_time_to_first_token_seconds_count",
                 "moe_infinity_inter_token_seconds_count", "moe_infinity_request_seconds_count",
                 "moe_infinity_prompt_tokens_total", "moe_infinity_generation_tokens_total",
                 "moe_infinity_expert_hits_total", "moe_infinity_expert_bytes_to_device_total",
                 "moe_infinity_expert_cache_occupancy", "moe_infinity_kv_blocks_total",
                 "moe_infinity_engine_steps_total", "moe_infinity_trace_collection_size",
                 'moe_infinity_http_requests_total{endpoint="/v1/completions",status="200"}'):
        assert _metric(server, name) > 0, name
    # Offloaded experts on the CPU: every miss copies one fp32 expert, nothing else is copied.
    expert_bytes = moe_core.ModelSpec.from_pretrained(moe_core.tiny_model_path()).expert_bytes(
        torch.float32)
    misses = _metric(server, "moe_infinity_expert_misses_total")
    assert misses > 0
    assert _metric(server, "moe_infinity_expert_bytes_to_device_total") == misses * expert_bytes
    assert _metric(server, "moe_infinity_queue_depth") == 0


# Queue limit and API key (an engine that never runs: its queue only fills) ---------------------

def test_full_queue_gets_429_and_the_api_key_is_required(served: ServingModel) -> None:
    engine = Engine(served, EngineConfig(max_queue=1, kv_bytes=1 << 20),
                    TraceKeeper(served.shape, None, 10, 0))
    engine.submit(GenerationRequest(request_id="x", prompt_ids=(1, 2), max_tokens=2),
                  lambda e: None)
    app = create_app(engine, MODEL, ServingMetrics(engine.snapshot), api_key="sekret")

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            assert (await http.get("/v1/models")).status_code == 401
            wrong = await http.get("/v1/models", headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401 and _is_openai_error(wrong.json())
            auth = {"Authorization": "Bearer sekret"}
            assert (await http.get("/v1/models", headers=auth)).status_code == 200
            full = await http.post("/v1/completions", headers=auth,
                                   json={"model": MODEL, "prompt": "a", "max_tokens": 2})
            assert full.status_code == 429 and full.headers["retry-after"] == "1"
            assert _is_openai_error(full.json())
            assert (await http.get("/health")).status_code == 503  # the engine is not running

    asyncio.run(main())


def test_metrics_table_in_the_docs_matches_the_exposition(server: Server) -> None:
    """Every metric docs/moe-infinity.md names is exported, and every exported one is named."""
    doc = (Path(__file__).resolve().parents[3] / "docs" / "moe-infinity.md").read_text()
    documented = set(re.findall(r"`(moe_infinity_[a-z_]+)", doc))
    text = httpx.get(f"{server.url}/metrics", timeout=5).text
    families = re.findall(r"^# TYPE (moe_infinity_[a-z_]+) \w+$", text, re.MULTILINE)
    # prometheus-client adds a `_created` timestamp beside each counter and histogram.
    exported = {name for name in families if not name.endswith("_created")}
    assert documented == exported
