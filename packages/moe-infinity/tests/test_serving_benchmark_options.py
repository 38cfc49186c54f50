"""`serve`/`chat`'s benchmark options: dummy weights of a shape, truncation, the fetch path and
routing set by hand (`ExpertSettings`), through `build_engine` and the engine thread."""

from __future__ import annotations

import queue
from dataclasses import replace
from pathlib import Path

import pytest
from moe_core import SettingError
from moe_infinity.serving.engine_setup import EngineSettings, build_engine
from moe_infinity.serving.expert_settings import ExpertSettings
from moe_infinity.serving.request import GenerationRequest, SequenceEvent
from moe_infinity.serving.runtime_policy import parse_serve_policy


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"fetch": "pinned"}, "--fetch must be copy or mapped"),
    ({"lanes": 3, "fetch": "mapped"}, "--lanes must be 1 or 2"),
    ({"lanes": 2}, "--lanes 2 needs --fetch mapped"),
    ({"num_layers": 0}, "--num-layers must be at least 1"),
    ({"routing": "zipf:q=1"}, "--routing 'zipf:q=1': unknown parameter"),
    ({"routing": "gaussian"}, "expected uniform"),
    ({"prefill": "evict"}, "--prefill must be admit or stream"),
])
def test_bad_settings_are_one_line_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(SettingError, match=message):
        ExpertSettings(**kwargs)  # type: ignore[arg-type]


def _settings(experts: ExpertSettings) -> EngineSettings:
    return EngineSettings(model="tiny-moe", device="cpu", dtype=None, gpu_memory_bytes=64 << 20,
                          kv_memory_bytes=8 << 20, policy=parse_serve_policy("lru"),
                          traces=None, save_every=0, trace_capacity=10, max_batch=4,
                          max_queue=8, prefill_chunk=64, experts=experts)


def test_more_layers_than_the_model_has_is_refused_before_loading() -> None:
    with pytest.raises(SettingError, match="--num-layers 99: the model has"):
        build_engine(_settings(ExpertSettings(dummy=True, num_layers=99)))


def _generate(settings: EngineSettings) -> list[SequenceEvent]:
    engine = build_engine(settings)
    events: queue.Queue[SequenceEvent] = queue.Queue()
    engine.start()
    try:
        engine.submit(GenerationRequest(request_id="a", prompt_ids=(1, 2, 3, 4), max_tokens=6,
                                        ignore_eos=True), events.put)
        out = [events.get(timeout=120)]
        while out[-1].finish_reason is None:
            out.append(events.get(timeout=120))
    finally:
        engine.stop()
    return out


def test_dummy_truncated_uniform_routing_mapped_fetch_serves(tmp_path: Path) -> None:
    experts = ExpertSettings(dummy=True, num_layers=2, fetch="mapped", routing="uniform")
    settings = _settings(experts)
    events = _generate(settings)
    assert events[-1].finish_reason == "length"
    assert sum(len(e.token_ids) for e in events) == 6


def test_streamed_prefill_serves_and_leaves_the_cache_as_loaded() -> None:
    """`--prefill stream`: the ring's 8 slots come out of the expert budget (24 MiB in all: 14
    cache slots of 480 KiB are left), a 300-token prompt (one chunk of 600 assignments, above
    the gather limit) streams its misses and admits none, and the decode continues."""
    experts = ExpertSettings(dummy=True, num_layers=2, fetch="mapped", prefill="stream",
                             routing="uniform")
    settings = replace(_settings(experts), gpu_memory_bytes=24 << 20, prefill_chunk=128)
    engine = build_engine(settings)
    runtime = engine.served.runtime
    assert runtime.prefill_ring is not None and runtime.cache is not None
    assert runtime.pool.nbytes + runtime.prefill_ring.nbytes <= engine.served.memory.expert_bytes
    held = set(runtime.cache.table.resident())
    events: queue.Queue[SequenceEvent] = queue.Queue()
    engine.start()
    try:
        engine.submit(GenerationRequest(request_id="p", prompt_ids=tuple(range(3, 303)),
                                        max_tokens=3, ignore_eos=True), events.put)
        tokens = []
        while True:
            event = events.get(timeout=120)
            tokens += event.token_ids
            if event.finish_reason is not None:
                break
    finally:
        engine.stop()
    stats = runtime.snapshot()
    assert len(tokens) == 3 and stats.streamed_bytes > 0 and stats.evictions == 0
    assert set(runtime.cache.table.resident()) == held


def test_uniform_routing_is_entered_by_the_engine_thread_and_put_back() -> None:
    engine = build_engine(_settings(ExpertSettings(dummy=True, num_layers=2,
                                                   routing="uniform")))
    blocks = engine.served.model.moe_blocks()
    assert all(b.routing_override is None for b in blocks)  # not before the thread runs
    seen: list[bool] = []
    engine.listener.on_first_token = lambda _s: seen.append(  # type: ignore[method-assign]
        all(b.routing_override is not None for b in blocks))
    events: queue.Queue[SequenceEvent] = queue.Queue()
    engine.start()
    try:
        engine.submit(GenerationRequest(request_id="b", prompt_ids=(5, 6), max_tokens=2,
                                        ignore_eos=True), events.put)
        while events.get(timeout=120).finish_reason is None:
            pass
    finally:
        engine.stop()
    assert seen == [True]
    assert all(b.routing_override is None for b in blocks)  # put back when the thread ends
