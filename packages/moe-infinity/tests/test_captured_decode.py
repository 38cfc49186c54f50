"""Captured decode passes of the serving engine: the static pass computes what the ragged pass
computes (CPU), the engine says why it decodes eagerly, and on CUDA the replayed passes give the
eager engine's tokens and traces."""

from __future__ import annotations

import queue
import time
from typing import Any

import moe_core
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from moe_core import MoEForCausalLM
from moe_infinity.serving.block_allocator import BlockAllocator
from moe_infinity.serving.captured_decode import (
    PAST_BUCKET_TOKENS,
    StaticDecodePass,
    captured_decode_blocker,
)
from moe_infinity.serving.engine import Engine
from moe_infinity.serving.engine_config import EngineConfig
from moe_infinity.serving.expert_settings import ExpertSettings
from moe_infinity.serving.kv_pool import KVPool
from moe_infinity.serving.live_tracer import LiveTracer
from moe_infinity.serving.ragged_pass import PassRow, RaggedPass
from moe_infinity.serving.request import GenerationRequest, SequenceEvent
from moe_infinity.serving.serving_model import ServingModel, load_serving_model
from moe_infinity.serving.step_pass import run_pass
from moe_infinity.serving.trace_keeper import TraceKeeper

PROMPTS = ["Once upon a time, there was a little fox who", "def fibonacci(n):",
           "Tom has 3 apples and buys 5 more. How many apples does he have now?"]


def _two_prefilled(tiny: MoEForCausalLM) -> tuple[KVPool, KVPool, list[PassRow]]:
    """A pool with two sequences prefilled (35 and 11 tokens), a copy of it, and the rows of
    one decode step of both."""
    pool = KVPool(tiny.spec, 64, 8, tiny.dtype, "cpu")
    allocator = BlockAllocator(64, 8)
    a, b = list(range(5, 40)), list(range(100, 111))
    ta, tb = allocator.allocate(48), allocator.allocate(24)
    assert ta is not None and tb is not None
    run_pass(tiny, RaggedPass([PassRow(ta, 0, a), PassRow(tb, 0, b)], pool, tiny.device), pool)
    twin = KVPool(tiny.spec, 64, 8, tiny.dtype, "cpu")
    for layer, arenas in pool.arenas.items():
        for mine, theirs in zip(arenas, twin.arenas[layer], strict=True):
            theirs.copy_(mine)
    return pool, twin, [PassRow(ta, len(a), [7]), PassRow(tb, len(b), [9])]


def test_a_static_decode_pass_computes_what_the_ragged_pass_does(tiny: MoEForCausalLM) -> None:
    """Two sequences prefilled, then one decode step each way over copies of the same pool:
    the same logits, the same keys and values written, and the same traced routing (the past
    bucket reads unused slots the mask hides)."""
    pool, twin, rows = _two_prefilled(tiny)
    with LiveTracer(tiny) as tracer:
        ragged = RaggedPass(rows, pool, tiny.device)
        tracer.begin_pass(ragged.row_of_token, 2)
        want = run_pass(tiny, ragged, pool)
        want_routing = tracer.end_pass()
        static = StaticDecodePass(2, PAST_BUCKET_TOKENS, twin, tiny.device)
        static.fill(rows)
        tracer.begin_pass(static.row_of_token, 2)
        got = run_pass(tiny, static, twin)  # type: ignore[arg-type]
        counts, looks = tracer.drop_pass()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert np.array_equal(counts.numpy(), want_routing[0])
    np.testing.assert_allclose(looks.numpy(), want_routing[1], atol=1e-6)
    for layer, arenas in pool.arenas.items():
        for mine, theirs in zip(arenas, twin.arenas[layer], strict=True):
            torch.testing.assert_close(theirs, mine, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("static", [False, True], ids=["ragged", "static"])
def test_fused_decode_attention_over_the_pool_equals_the_gathered_keys(
        tiny: MoEForCausalLM, monkeypatch: pytest.MonkeyPatch, static: bool) -> None:
    """The fused decode path (CUDA only in a served model) run on the CPU through its torch
    references: the new key and value written at each row's slot of the shared pool
    (`PooledKV.write_target`) and the keys read through `key_slots`, in the mask's order, give
    the logits and the pool of the gathered path, for two rows of different lengths."""
    pool, twin, rows = _two_prefilled(tiny)

    def decode(kv_pool: KVPool) -> torch.Tensor:
        if static:
            batch = StaticDecodePass(2, PAST_BUCKET_TOKENS, kv_pool, tiny.device)
            batch.fill(rows)
            return run_pass(tiny, batch, kv_pool)  # type: ignore[arg-type]
        return run_pass(tiny, RaggedPass(rows, kv_pool, tiny.device), kv_pool)

    want = decode(twin)  # the gathered path
    # moe-core's GQA attention class, found on the model (its module is moe-core's own business)
    GQAAttention = type(next(m for m in tiny.modules() if hasattr(m, "_decode_fused")))
    unfused = GQAAttention.forward
    fused_calls = []

    def fused_on_cpu(self: Any, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                     mask: torch.Tensor, cache: object) -> torch.Tensor:
        if x.shape[1] == 1 and self._decodes_fused(cache):  # type: ignore[arg-type]
            fused_calls.append(self.layer)
            return self._decode_fused(x, rope, mask, cache)  # type: ignore[arg-type]
        return unfused(self, x, rope, mask, cache)  # type: ignore[arg-type]

    monkeypatch.setattr(GQAAttention, "forward", fused_on_cpu)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)  # no driver
    got = decode(pool)
    assert len(fused_calls) == tiny.spec.num_layers
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for layer, arenas in pool.arenas.items():
        for mine, theirs in zip(arenas, twin.arenas[layer], strict=True):
            torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=1e-6)


def test_a_refilled_static_pass_serves_the_next_step(tiny: MoEForCausalLM) -> None:
    """The same static pass object, refilled, decodes the following token too (what a replay
    does with the graph's buffers)."""
    pool = KVPool(tiny.spec, 64, 8, tiny.dtype, "cpu")
    table = BlockAllocator(64, 8).allocate(40)
    assert table is not None
    prompt = list(range(3, 20))
    run_pass(tiny, RaggedPass([PassRow(table, 0, prompt)], pool, tiny.device), pool)
    static = StaticDecodePass(1, PAST_BUCKET_TOKENS, pool, tiny.device)
    tokens = [5, 6, 8]
    for i, token in enumerate(tokens):
        static.fill([PassRow(table, len(prompt) + i, [token])])
        logits = run_pass(tiny, static, pool)  # type: ignore[arg-type]
    want = tiny(torch.tensor([[*prompt, *tokens]]))[0, -1].float()
    torch.testing.assert_close(logits[0], want, atol=1e-4, rtol=1e-4)


def test_a_static_pass_takes_its_tokens_from_the_previous_pass_on_the_device(
        tiny: MoEForCausalLM) -> None:
    """Each step's token is the previous pass's argmax, handed to `fill` as a device tensor
    while the host rows hold a placeholder (an engine step enqueued ahead): the greedy
    continuation `generate` gives."""
    pool = KVPool(tiny.spec, 64, 8, tiny.dtype, "cpu")
    table = BlockAllocator(64, 8).allocate(40)
    assert table is not None
    prompt = list(range(3, 20))
    ids = run_pass(tiny, RaggedPass([PassRow(table, 0, prompt)], pool, tiny.device),
                   pool).argmax(dim=-1)  # [1]
    static = StaticDecodePass(1, PAST_BUCKET_TOKENS, pool, tiny.device)
    tokens = []
    for i in range(4):
        tokens.append(int(ids[0]))
        static.fill([PassRow(table, len(prompt) + i, [0])], ids)
        ids = run_pass(tiny, static, pool).argmax(dim=-1)  # type: ignore[arg-type]
    tokens.append(int(ids[0]))
    result = moe_core.generate(tiny, [prompt], max_new_tokens=5, eos_token_id=[])
    assert tokens == result.tokens[0, :5].tolist()


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.data())
def test_an_advanced_static_pass_holds_what_a_fresh_fill_writes(
        tiny: MoEForCausalLM, num_rows: int, data: st.DataObject) -> None:
    """Steps of the same rows one token further are written in place (only the new token's
    entries), others in full; either way the buffer is that of a pass filled afresh."""
    pool = KVPool(tiny.spec, 64, 4, tiny.dtype, "cpu")
    allocator = BlockAllocator(64, 4)
    past = 32
    tables = [allocator.allocate(past + 1) for _ in range(num_rows + 1)]
    static = StaticDecodePass(num_rows, past, pool, tiny.device)
    full_fills = []
    original = static._fill_all
    static._fill_all = lambda rows: (full_fills.append(rows), original(rows))[1]  # type: ignore[method-assign]
    rows: list[PassRow] = []
    expected_full = 0
    for _ in range(data.draw(st.integers(1, 12))):
        advance = bool(rows) and data.draw(st.booleans()) and all(
            r.num_cached < past for r in rows)
        if advance:
            rows = [PassRow(r.table, r.num_cached + 1, [data.draw(st.integers(0, 99))])
                    for r in rows]
        else:
            picked = data.draw(st.permutations(range(len(tables))))[:num_rows]
            rows = [PassRow(tables[i] or [], data.draw(st.integers(0, past)),
                            [data.draw(st.integers(0, 99))]) for i in picked]
            expected_full += 1
        static.fill(rows)
        fresh = StaticDecodePass(num_rows, past, pool, tiny.device)
        fresh.fill(rows)
        assert torch.equal(static.buffer, fresh.buffer)
    # A drawn "fresh" step can happen to be an advance; never the other way round.
    assert len(full_fills) <= expected_full


def test_the_engine_says_why_it_decodes_eagerly(served: ServingModel) -> None:
    keeper = TraceKeeper(served.shape, None, 10, 0)
    on_cpu = Engine(served, EngineConfig(kv_bytes=8 << 20), keeper)
    assert on_cpu.eager_decode_reason() == "the model is on cpu, not CUDA"
    assert captured_decode_blocker(served.model) == "the model is on cpu, not CUDA"
    off = Engine(served, EngineConfig(kv_bytes=8 << 20, graphs=False), keeper)
    assert off.eager_decode_reason() == "--no-graphs"


@pytest.fixture(scope="module")
def served() -> ServingModel:
    layout_bytes = 491_520
    budget = moe_core.ModelSpec.from_pretrained(moe_core.tiny_model_path()).dense_bytes(
        torch.float32) + (8 << 20) + 12 * layout_bytes
    return load_serving_model("tiny-moe", "cpu", budget, "lru", max_batch=8, kv_bytes=8 << 20)


def _run(served: ServingModel, graphs: bool, requests: list[GenerationRequest],
         overlap: bool = True) -> tuple[dict[str, list[int]], list[np.ndarray], Engine]:
    keeper = TraceKeeper(served.shape, None, 100, 0)
    traces: list[np.ndarray] = []
    original = keeper.add
    keeper.add = lambda eam: (traces.append(eam), original(eam))[1]  # type: ignore[method-assign]
    engine = Engine(served, EngineConfig(kv_bytes=8 << 20, max_batch=8, graphs=graphs,
                                         overlap=overlap), keeper)
    events: queue.Queue[SequenceEvent] = queue.Queue()
    for request in requests:  # all admitted and prefilled by the first step
        engine.submit(request, events.put)
    engine.start()
    try:
        out: dict[str, list[int]] = {r.request_id: [] for r in requests}
        done, deadline = 0, time.monotonic() + 300
        while done < len(requests):
            event = events.get(timeout=max(0.1, deadline - time.monotonic()))
            out[event.request_id].extend(event.token_ids)
            done += event.finish_reason is not None
    finally:
        engine.stop()
    return out, traces, engine


_LAYOUT_BYTES = 491_520  # one float32 expert block of the tiny model


def _cuda_served(lanes: int) -> ServingModel:
    """The float32 tiny model on CUDA with 12 expert slots of 96, mapped fetch, `lanes`."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("cupy")
    budget = moe_core.ModelSpec.from_pretrained(moe_core.tiny_model_path()).dense_bytes(
        torch.float32) + (8 << 20) + 12 * _LAYOUT_BYTES
    return load_serving_model("tiny-moe", "cuda", budget, "lru", max_batch=8, kv_bytes=8 << 20,
                              dtype="float32",
                              experts=ExpertSettings(fetch="mapped", lanes=lanes))


def _request(served: ServingModel, i: int, text: str) -> GenerationRequest:
    return GenerationRequest(request_id=f"{i}", prompt_ids=tuple(
        served.tokenizer(text)["input_ids"]), max_tokens=24, ignore_eos=True)


def _assert_captured_like_eager(served: ServingModel, batch: list[GenerationRequest]) -> None:
    """`batch` decoded from replayed graphs gives the eager engine's tokens and traces."""
    eager, eager_traces, _ = _run(served, False, batch)
    got, got_traces, engine = _run(served, True, batch)
    assert engine.eager_decode_reason() is None
    assert engine._captured is not None and engine._captured.captures > 0
    assert engine._captured.failures == 0
    assert got == eager
    for want, have in zip(sorted(t.tolist() for t in eager_traces),
                          sorted(t.tolist() for t in got_traces), strict=True):
        np.testing.assert_allclose(have, want, atol=1e-3)


def _assert_engine_gives_generate_tokens(served: ServingModel, graphs: tuple[bool, ...]) -> None:
    """Three requests decoded together by the engine give the tokens of the model's own greedy
    `generate` (its growing cache, unfused attention), each alone."""
    batch = [_request(served, i, p) for i, p in enumerate(PROMPTS)]
    want = {}
    for request in batch:
        prompt = torch.tensor([request.prompt_ids], device=served.model.device)
        out = served.model.generate(prompt, max_new_tokens=request.max_tokens,
                                    eos_token_id=[], graphs=False)  # [1, new] tokens
        want[request.request_id] = out[0].tolist()
    for captured in graphs:
        got, _, _ = _run(served, captured, batch)
        assert got == want


def test_engine_passes_give_the_models_own_greedy_tokens(served: ServingModel) -> None:
    """On the CPU (eager passes, attention over gathered keys): the reference the CUDA test
    below holds the fused in-place passes to."""
    _assert_engine_gives_generate_tokens(served, (False,))


@pytest.mark.gpu
def test_cuda_engine_passes_give_the_models_own_greedy_tokens() -> None:
    """The engine's decode passes on CUDA attend in place in the paged pool (moe-core's fused
    decode kernels through `PooledKV.write_target` and `key_slots`), eagerly and replayed; both
    give `generate`'s tokens."""
    served = _cuda_served(1)
    try:
        _assert_engine_gives_generate_tokens(served, (False, True))
    finally:
        served.runtime.close()


@pytest.mark.gpu
@pytest.mark.parametrize("lanes", [1, 2])
def test_cuda_captured_decode_gives_the_eager_engines_tokens_and_traces(lanes: int) -> None:
    """Float32 tiny model on CUDA, 12 expert slots of 96 (mapped fetch; two lanes too): one
    request alone, then three together, each decoded from replayed graphs; tokens and traces
    equal the eager engine's."""
    served = _cuda_served(lanes)
    try:
        alone = [_request(served, 0, PROMPTS[0])]
        together = [_request(served, i + 1, p) for i, p in enumerate(PROMPTS)]
        for batch in (alone, together):
            _assert_captured_like_eager(served, batch)
    finally:
        served.runtime.close()


@pytest.mark.gpu
def test_cuda_captured_decode_of_several_rows_takes_the_grouped_mapped_path() -> None:
    """The gather limit lowered to one token's rows: passes of two or three rows take the
    grouped mapped path (moe-core's decision 0016), and are still captured and replayed with the
    eager engine's tokens and traces."""
    served = _cuda_served(lanes=1)
    try:
        top_k = served.model.spec.moe.router.top_k
        executors = list(served.runtime.executors.values())
        for executor in executors:
            executor.gather_limit_bytes = top_k * _LAYOUT_BYTES  # type: ignore[attr-defined]
            executor.in_place_limit_assignments = top_k  # type: ignore[attr-defined]
        paths = {x.call_path(3 * top_k) for x in executors}  # type: ignore[attr-defined]
        assert paths == {"grouped"}
        _assert_captured_like_eager(served, [_request(served, i, p)
                                             for i, p in enumerate(PROMPTS)])
    finally:
        served.runtime.close()


@pytest.mark.gpu
def test_cuda_replays_enqueued_ahead_give_the_serial_engines_tokens_and_traces() -> None:
    """Replays enqueued on the previous replay's tokens, still on the device (docs/decisions/
    0017): rows ending at different steps (token limits, a stop string, EOS), a seeded sampled
    row, and a 240-token prompt whose decode crosses the 256-slot past bucket, so a graph is
    captured for a pass enqueued ahead. Tokens and traces equal the serial captured engine's."""
    served = _cuda_served(lanes=1)

    def ids(text: str) -> tuple[int, ...]:
        return tuple(served.tokenizer(text)["input_ids"])

    try:
        batch = [
            GenerationRequest(request_id="long", prompt_ids=tuple(range(10, 250)),
                              max_tokens=30, ignore_eos=True),
            GenerationRequest(request_id="short", prompt_ids=ids(PROMPTS[1]), max_tokens=7),
            GenerationRequest(request_id="stop", prompt_ids=ids(PROMPTS[0]), max_tokens=40,
                              stop=("Lily",)),
            GenerationRequest(request_id="chat", prompt_ids=ids(
                "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"), max_tokens=60),
            GenerationRequest(request_id="sampled", prompt_ids=ids(PROMPTS[2]), max_tokens=20,
                              ignore_eos=True, sampling=moe_core.SamplingParams(
                                  temperature=1.0, top_k=40, seed=5)),
        ]
        serial, serial_traces, serial_engine = _run(served, True, batch, overlap=False)
        ahead, ahead_traces, engine = _run(served, True, batch)
        assert engine._captured is not None and engine._captured.captures > 0
        assert engine._captured.failures == 0
        assert engine.snapshot().steps_ahead > 0 and serial_engine.snapshot().steps_ahead == 0
        assert ahead == serial
        for want, have in zip(sorted(t.tolist() for t in serial_traces),
                              sorted(t.tolist() for t in ahead_traces), strict=True):
            np.testing.assert_allclose(have, want, atol=1e-3)
    finally:
        served.runtime.close()
