"""The serving engine without HTTP: KV blocks, ragged passes, the scheduler, stop strings, live
tracing, and whole requests through the engine thread against `moe_core.generate`."""

from __future__ import annotations

import queue
import time
from pathlib import Path

import moe_core
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from moe_core import MoEForCausalLM, SamplingParams
from moe_infinity import ActivationTracer, TraceCollection
from moe_infinity.serving.block_allocator import BlockAllocator
from moe_infinity.serving.engine import Engine, QueueFullError
from moe_infinity.serving.engine_config import EngineConfig
from moe_infinity.serving.expert_settings import ExpertSettings
from moe_infinity.serving.kv_pool import KVPool
from moe_infinity.serving.ragged_pass import PassRow, RaggedPass
from moe_infinity.serving.request import GenerationRequest, SequenceEvent
from moe_infinity.serving.scheduler import IDLE_PREFILL_CHUNKS, Scheduler
from moe_infinity.serving.sequence import Sequence
from moe_infinity.serving.serving_model import ServingModel, load_serving_model
from moe_infinity.serving.step_pass import run_pass
from moe_infinity.serving.text_stream import TextStream
from moe_infinity.serving.trace_keeper import TraceKeeper

PROMPTS = ["Once upon a time, there was a little fox who", "def fibonacci(n):",
           "Tom has 3 apples and buys 5 more. How many apples does he have now?",
           "Il était une fois"]



def _engine(served: ServingModel, tmp_path: Path | None = None, **config: int) -> Engine:
    keeper = TraceKeeper(served.shape, tmp_path / "t.bin" if tmp_path else None, 100, 0)
    engine = Engine(served, EngineConfig(kv_bytes=config.pop("kv_bytes", 8 << 20), **config),
                    keeper)
    engine.start()
    return engine


def _run(engine: Engine, requests: list[GenerationRequest], timeout_s: float = 120.0
         ) -> dict[str, list[SequenceEvent]]:
    """Submit every request at once; every request's events, in order."""
    events: queue.Queue[SequenceEvent] = queue.Queue()
    for request in requests:
        engine.submit(request, events.put)
    out: dict[str, list[SequenceEvent]] = {r.request_id: [] for r in requests}
    done = 0
    deadline = time.monotonic() + timeout_s
    while done < len(requests):
        event = events.get(timeout=max(0.1, deadline - time.monotonic()))
        out[event.request_id].append(event)
        done += event.finish_reason is not None
    return out


def _ids(served: ServingModel, text: str) -> tuple[int, ...]:
    return tuple(served.tokenizer(text)["input_ids"])


def _run_together(served: ServingModel, prompts: list[str], max_tokens: int
                  ) -> tuple[list[GenerationRequest], dict[str, list[SequenceEvent]]]:
    """Every prompt submitted at once to a fresh engine (8 rows, 8-token prefill chunks): the
    requests and their events."""
    engine = _engine(served, max_batch=8, prefill_chunk=8)
    try:
        requests = [GenerationRequest(request_id=str(i), prompt_ids=_ids(served, p),
                                      max_tokens=max_tokens) for i, p in enumerate(prompts)]
        return requests, _run(engine, requests)
    finally:
        engine.stop()


def _tokens(events: list[SequenceEvent]) -> list[int]:
    return [t for e in events for t in e.token_ids]


def _generated(model: MoEForCausalLM, request: GenerationRequest, max_tokens: int
               ) -> tuple[list[int], str]:
    """`moe_core.generate` of the request's prompt alone: its tokens and finish reason."""
    result = moe_core.generate(model, [list(request.prompt_ids)], max_new_tokens=max_tokens)
    return result.tokens[0, : result.lengths[0]].tolist(), result.finish_reasons[0]


# Blocks and the scheduler -----------------------------------------------------------------------

def test_block_allocator_hands_out_each_block_once() -> None:
    allocator = BlockAllocator(8, 4)
    a, b = allocator.allocate(9), allocator.allocate(12)
    assert a is not None and b is not None and len(a) == 3 and len(b) == 3
    assert not set(a) & set(b) and allocator.num_free == 2
    assert allocator.allocate(9) is None  # 3 blocks needed, 2 free: wait, do not fail
    allocator.release(a)
    with pytest.raises(ValueError, match="not an allocated block"):
        allocator.release(a)
    assert allocator.num_free == 5


def _seq(num_prompt: int, max_tokens: int, name: str) -> Sequence:
    request = GenerationRequest(request_id=name, prompt_ids=tuple(range(1, num_prompt + 1)),
                                max_tokens=max_tokens)
    return Sequence(request, lambda e: None, lambda ids: "", torch.device("cpu"))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.integers(1, 20)), min_size=1, max_size=20),
       st.integers(1, 5), st.integers(1, 32), st.data())
def test_scheduler_invariants(shapes: list[tuple[int, int]], max_batch: int, chunk: int,
                              data: st.DataObject) -> None:
    """Whatever arrives: the batch never exceeds max_batch, blocks are never shared and
    always cover a running sequence's reservation, prefill per step stays within the chunk
    (within `IDLE_PREFILL_CHUNKS` chunks when no sequence decodes), admission is first come
    first served, and everything eventually runs and finishes."""
    allocator = BlockAllocator(16, 4)
    scheduler = Scheduler(allocator, max_batch, chunk)
    seqs = [_seq(p, m, str(i)) for i, (p, m) in enumerate(shapes)]
    seqs = [s for s in seqs if scheduler.fits_pool(s)]
    for s in seqs:
        scheduler.add(s)
    admitted: list[str] = []
    for _ in range(2000):
        if scheduler.is_idle:
            break
        plan = scheduler.plan()
        for s in scheduler.running:
            if s.request_id not in admitted:
                admitted.append(s.request_id)
        assert len(scheduler.running) <= max_batch
        tables = [b for s in scheduler.running for b in (s.table or [])]
        assert len(tables) == len(set(tables)) == allocator.num_used
        for s in scheduler.running:
            assert len(s.table or []) * 4 >= s.request.num_reserved_tokens
        assert sum(n for _, n in plan.prefill) <= chunk * (1 if plan.decode else
                                                            IDLE_PREFILL_CHUNKS)
        assert all(len(s.pending_ids()) == 1 for s in plan.decode)
        for s in plan.decode:  # the engine's side of a step, without a model
            s.num_cached += 1
            s.output_ids.append(7)
        for s, n in plan.prefill:
            s.num_cached += n
            if not s.is_prefilling:
                s.output_ids.append(7)
        for s in list(scheduler.running):
            ended = len(s.output_ids) >= s.request.max_tokens or data.draw(st.booleans())
            if s.output_ids and ended:
                scheduler.remove(s)
    assert scheduler.is_idle and allocator.num_free == allocator.num_blocks
    assert admitted == [s.request_id for s in seqs]


# Ragged passes ----------------------------------------------------------------------------------

def test_a_step_with_no_decode_row_prefills_more_chunks() -> None:
    scheduler = Scheduler(BlockAllocator(64, 4), 4, 8)
    first, second = _seq(60, 4, "a"), _seq(60, 4, "b")
    scheduler.add(first)
    plan = scheduler.plan()
    assert plan.prefill == [(first, 8 * IDLE_PREFILL_CHUNKS)]  # nobody waits on this step
    first.num_cached = 60
    first.output_ids.append(7)
    scheduler.add(second)
    plan = scheduler.plan()
    assert plan.decode == [first] and plan.prefill == [(second, 8)]  # a stream is running


def test_ragged_passes_match_the_model_forward(tiny: MoEForCausalLM) -> None:
    """Two sequences of different lengths, one prefilled in two chunks while the other
    decodes: every row's logits equal a plain forward over its whole sequence."""
    pool = KVPool(tiny.spec, 16, 8, tiny.dtype, "cpu")
    allocator = BlockAllocator(16, 8)
    a, b = list(range(5, 40)), list(range(100, 111))
    ta, tb = allocator.allocate(48), allocator.allocate(24)
    assert ta is not None and tb is not None
    first = run_pass(tiny, RaggedPass([PassRow(ta, 0, a[:20]), PassRow(tb, 0, b)], pool,
                                      tiny.device), pool)
    second = run_pass(tiny, RaggedPass([PassRow(tb, 11, [7]), PassRow(ta, 20, a[20:])], pool,
                                       tiny.device), pool)
    ref_a = tiny(torch.tensor([a]))[0].float()
    ref_b = tiny(torch.tensor([[*b, 7]]))[0].float()
    for got, want in ((first[0], ref_a[19]), (first[1], ref_b[10]), (second[0], ref_b[11]),
                      (second[1], ref_a[-1])):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_kv_pool_is_sized_from_its_budget(tiny: MoEForCausalLM) -> None:
    per_token = tiny.spec.kv_bytes_per_token(torch.float32)
    blocks = KVPool.blocks_for_budget(tiny.spec, 10 * 16 * per_token + 5, 16, torch.float32)
    assert blocks == 10
    assert KVPool(tiny.spec, blocks, 16, torch.float32, "cpu").nbytes() == 10 * 16 * per_token
    with pytest.raises(moe_core.SettingError, match="holds no block"):
        KVPool.blocks_for_budget(tiny.spec, per_token, 16, torch.float32)


# Stop strings -----------------------------------------------------------------------------------

def _chars(ids: list[int]) -> str:
    return "".join(chr(i) for i in ids)


def test_text_stream_holds_back_a_possible_stop_string_and_never_releases_it() -> None:
    stream = TextStream(_chars, stop=("END",))
    pieces = [stream.push(ord(c)) for c in "abEN"]
    assert "".join(pieces) == "ab"  # "EN" might become "END"
    assert stream.push(ord("x")) == "ENx"
    assert "".join(stream.push(ord(c)) for c in "yEND") == "y"
    assert stream.stopped and stream.flush() == ""


@given(st.text(alphabet="abcXY", max_size=30), st.lists(st.text(alphabet="abcXY", min_size=1,
                                                                  max_size=3), max_size=3))
def test_text_stream_releases_exactly_the_text_before_the_first_stop(text: str,
                                                                    stops: list[str]) -> None:
    """Generation stops at the first token after which a stop string appears; the text is
    cut where the earliest one starts."""
    stream = TextStream(_chars, stop=stops)
    out = "".join(stream.push(ord(c)) for c in text) + stream.flush()
    expected = text
    for end in range(1, len(text) + 1):
        cuts = [text[:end].find(s) for s in stops if s in text[:end]]
        if cuts:
            expected = text[: min(cuts)]
            break
    assert out == expected


# Whole requests through the engine --------------------------------------------------------------

def test_engine_greedy_equals_generate_in_a_ragged_chunked_batch(served: ServingModel,
                                                                  tiny: MoEForCausalLM) -> None:
    """Four prompts of different lengths run together, prefilled 8 tokens per step, through
    offloaded experts (12 slots for 96 experts): each greedy output equals `generate` of the
    prompt alone on the plain model."""
    requests, events = _run_together(served, PROMPTS, 20)
    for request in requests:
        got = _tokens(events[request.request_id])
        expected, reason = _generated(tiny, request, 20)
        assert got == expected
        text = "".join(e.text for e in events[request.request_id])
        assert text == served.decode(got)
        last = events[request.request_id][-1]
        assert last.finish_reason == ("stop" if reason == "eos" else "length")
        assert last.num_output_tokens == len(got)
    assert served.runtime.snapshot().evictions > 0  # the cache really was too small


def test_lookahead_prefetch_in_the_engine_keeps_greedy_output_and_is_used(
        tiny: MoEForCausalLM) -> None:
    """`--prefetch lookahead`: the next layer's likely experts are copied ahead inside ragged
    batches; outputs stay `generate`'s, and the prefetches are used."""
    layout_bytes = 491_520
    spec = moe_core.ModelSpec.from_pretrained(moe_core.tiny_model_path())
    budget = spec.dense_bytes(torch.float32) + (8 << 20) + 24 * layout_bytes
    plan = moe_core.cache_plan("lru", "lookahead", spec)
    served = load_serving_model("tiny-moe", "cpu", budget, "lru", max_batch=8,
                                kv_bytes=8 << 20, prefetcher=plan.prefetcher)
    requests, events = _run_together(served, PROMPTS[:3], 12)
    for request in requests:
        assert _tokens(events[request.request_id]) == _generated(tiny, request, 12)[0]
    stats = served.runtime.snapshot()
    assert stats.prefetches_issued > 0 and stats.prefetches_used > 0


def test_fp8_experts_in_the_engine_equal_fp8_offloaded_generate() -> None:
    """`--expert-dtype fp8`: the served model holds e4m3 experts, its slots are counted from the
    FP8 layout (12 FP8 experts' bytes give 12 slots, where fp32 blocks would give 3), and each
    greedy output equals `generate` over `load_offloaded(..., expert_dtype="fp8")`."""
    spec = moe_core.ModelSpec.from_pretrained(moe_core.tiny_model_path())
    fp8_bytes = moe_core.ExpertLayout(spec.hidden_size, spec.moe.expert_intermediate_size,
                                      moe_core.FP8).nbytes
    budget = spec.dense_bytes(torch.float32) + (8 << 20) + 12 * fp8_bytes
    served = load_serving_model("tiny-moe", "cpu", budget, "lru", max_batch=8, kv_bytes=8 << 20,
                                experts=ExpertSettings(expert_dtype="fp8"))
    assert served.runtime.store.layout.is_fp8
    assert served.runtime.pool.num_slots == 12
    reference = moe_core.load_offloaded("tiny-moe", "cpu", 12 * fp8_bytes, dtype=torch.float32,
                                        expert_dtype="fp8")
    requests, events = _run_together(served, PROMPTS, 12)
    for request in requests:
        assert _tokens(events[request.request_id]) == _generated(reference.model, request, 12)[0]


def test_expert_settings_refuse_an_unknown_expert_dtype() -> None:
    with pytest.raises(moe_core.SettingError, match="--expert-dtype must be fp8"):
        ExpertSettings(expert_dtype="int4")


def test_long_prompt_prefill_does_not_stall_a_running_stream(served: ServingModel) -> None:
    engine = _engine(served, max_batch=4, prefill_chunk=16)
    events: queue.Queue[SequenceEvent] = queue.Queue()
    try:
        short = GenerationRequest(request_id="short", prompt_ids=_ids(served, "Once upon"),
                                  max_tokens=60, ignore_eos=True)
        engine.submit(short, events.put)
        while events.get(timeout=60).request_id != "short":
            pass
        long_ids = tuple(range(10, 10 + 160))  # 10 chunks of 16
        engine.submit(GenerationRequest(request_id="long", prompt_ids=long_ids, max_tokens=1),
                      events.put)
        order = []
        while True:
            event = events.get(timeout=60)
            order.append(event.request_id)
            if event.request_id == "long":
                break
    finally:
        engine.stop()
    # The long prompt took 10 steps to prefill; the short stream got a token at each.
    assert order.count("short") >= 9


def test_requests_wait_for_kv_blocks_instead_of_failing(served: ServingModel) -> None:
    per_block = served.model.spec.kv_bytes_per_token(served.model.dtype) * 16
    engine = _engine(served, max_batch=8, kv_bytes=4 * per_block)  # 64 tokens of KV
    try:
        requests = [GenerationRequest(request_id=str(i), prompt_ids=_ids(served, p),
                                      max_tokens=24, ignore_eos=True)
                    for i, p in enumerate(PROMPTS[:3])]  # each reserves 2 of the 4 blocks
        seen_queued = []
        events: queue.Queue[SequenceEvent] = queue.Queue()
        for r in requests:
            engine.submit(r, events.put)
        finished = 0
        while finished < 3:
            event = events.get(timeout=60)
            finished += event.finish_reason is not None
            seen_queued.append(engine.snapshot().queued)
    finally:
        engine.stop()
    assert max(seen_queued) >= 1 and finished == 3


def test_full_queue_and_oversized_requests_are_refused(served: ServingModel) -> None:
    keeper = TraceKeeper(served.shape, None, 10, 0)
    engine = Engine(served, EngineConfig(max_queue=2, kv_bytes=1 << 20), keeper)  # not started
    request = GenerationRequest(request_id="a", prompt_ids=(1, 2), max_tokens=4)
    engine.submit(request, lambda e: None)
    engine.submit(request, lambda e: None)
    with pytest.raises(QueueFullError, match="queue is full"):
        engine.submit(request, lambda e: None)
    huge = GenerationRequest(request_id="b", prompt_ids=(1, 2), max_tokens=5000)
    with pytest.raises(moe_core.RequestError, match="at most"):
        engine.submit(huge, lambda e: None)


def test_cancel_frees_the_slot_and_blocks(served: ServingModel) -> None:
    engine = _engine(served, max_batch=4)
    events: queue.Queue[SequenceEvent] = queue.Queue()
    try:
        engine.submit(GenerationRequest(request_id="c", prompt_ids=_ids(served, "Hello"),
                                        max_tokens=500, ignore_eos=True), events.put)
        events.get(timeout=60)
        deadline = time.monotonic() + 10
        while engine.snapshot().kv_blocks_used == 0 and time.monotonic() < deadline:
            time.sleep(0.01)  # the step that admitted it is published after its events
        assert engine.snapshot().kv_blocks_used > 0 and engine.snapshot().running == 1
        engine.cancel("c")
        while (event := events.get(timeout=60)).finish_reason is None:
            pass
        assert event.finish_reason == "cancelled" and event.num_output_tokens < 500
        deadline = time.monotonic() + 10
        while engine.snapshot().running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.snapshot().running == 0 and engine.snapshot().kv_blocks_used == 0
    finally:
        engine.stop()


def test_sampling_is_seeded_per_request(served: ServingModel) -> None:
    engine = _engine(served, max_batch=4)
    try:
        sampling = SamplingParams(temperature=1.0, top_k=50, seed=1234)
        requests = [GenerationRequest(request_id=str(i), prompt_ids=_ids(served, PROMPTS[0]),
                                      max_tokens=12, sampling=sampling, ignore_eos=True)
                    for i in range(2)]
        events = _run(engine, requests)
    finally:
        engine.stop()
    tokens = [[t for e in events[str(i)] for t in e.token_ids] for i in range(2)]
    assert tokens[0] == tokens[1] and len(tokens[0]) == 12


# Live tracing -----------------------------------------------------------------------------------

def test_live_traces_equal_the_batch_one_tracer_and_are_saved(served: ServingModel,
                                                              tiny: MoEForCausalLM,
                                                              tmp_path: Path) -> None:
    """A request's trace recorded in a batch of three equals `ActivationTracer`'s of the
    prompt run alone; the collection gets every request and is saved as a valid file."""
    engine = _engine(served, tmp_path, max_batch=8, prefill_chunk=512)
    requests = [GenerationRequest(request_id=str(i), prompt_ids=_ids(served, p), max_tokens=8,
                                  ignore_eos=True) for i, p in enumerate(PROMPTS[:3])]
    captured: dict[str, np.ndarray] = {}
    original = engine.keeper.add
    engine.keeper.add = lambda eam: (captured.setdefault(str(len(captured)), eam),  # type: ignore[method-assign]
                                     original(eam))[1]
    try:
        _run(engine, requests)
    finally:
        engine.stop()
    saved = TraceCollection.load(tmp_path / "t.bin", expect=served.shape)
    assert len(saved) == 3
    with ActivationTracer(tiny) as tracer:
        alone = []
        for request in requests:
            tracer.begin_request()
            tiny.generate([list(request.prompt_ids)], max_new_tokens=8, eos_token_id=[])
            alone.append(tracer.end_request(request.request_id).eam.astype(np.float32))
    stored = sorted(saved.counts.tolist())
    assert stored == sorted(a.tolist() for a in alone)
