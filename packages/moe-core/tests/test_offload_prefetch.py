"""Prefetchers in the on-demand runtime: results never change, lookahead guesses are used on real
routing, wasted prefetches are counted, and graph-mode steps are asked between replays.

CPU, fp32: the embedded tiny model (trained: real routing) and a tiny DeepSeek-V3 (dense first
layer, shared experts), through `CpuCopyEngine` and a CPU slot pool.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from moe_core import (
    CpuCopyEngine,
    ExpertId,
    GpuSlotPool,
    HostExpertStore,
    LookaheadPrefetcher,
    MoEForCausalLM,
    OffloadRuntime,
    Prefetcher,
    RoutingTape,
    install_offloading,
    load_model,
    load_offloaded,
    load_tokenizer,
    replay_routing,
    tiny_model_path,
)
from moe_core.offload.slot_cache import ExpertSlotCache

PROMPTS = ["Once upon a time, there was a little fox who", "def fibonacci(n):",
           "Der kleine Hund lief schnell nach Hause, weil"]


def offloaded(folder: Path, num_slots: int, prefetch: bool | int = True, **kwargs: object
              ) -> tuple[MoEForCausalLM, OffloadRuntime]:
    model = load_model(folder, dtype="float32")
    store = HostExpertStore.from_model(model, pin=False)
    pool = GpuSlotPool(store.layout, num_slots, device="cpu")
    top = None if prefetch is True else int(prefetch)
    prefetcher = LookaheadPrefetcher(model, top) if prefetch else None
    runtime = install_offloading(model, store, pool, CpuCopyEngine(), prefetcher=prefetcher,
                                 **kwargs)  # type: ignore[arg-type]
    return model, runtime


def tiny_prompts() -> list[list[int]]:
    tokenizer = load_tokenizer(tiny_model_path())
    return [tokenizer(p)["input_ids"] for p in PROMPTS]


def generate_each(model: MoEForCausalLM, runtime: OffloadRuntime, prompts: list[list[int]],
                  new_tokens: int = 16) -> list[list[int]]:
    out = []
    for ids in prompts:
        runtime.begin_sequence()
        out.append(model.generate([ids], max_new_tokens=new_tokens, eos_token_id=[])[0].tolist())
    return out


@pytest.mark.parametrize(("fetch", "gather"), [("copy", True), ("copy", False), ("mapped", True)])
def test_greedy_tokens_are_unchanged_by_lookahead_prefetch(folder: Path, fetch: str,
                                                           gather: bool) -> None:
    reference = load_model(folder, dtype="float32")
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, reference.spec.vocab_size, (2, 6), generator=generator)
    expected = reference.generate(ids, max_new_tokens=8, eos_token_id=[])
    num_slots = 3 * reference.spec.moe.router.top_k  # far below one pass's experts
    model, runtime = offloaded(folder, num_slots, prefetch=4, fetch=fetch)
    if not gather:
        for executor in runtime.executors.values():
            executor.gather_limit_bytes = 0  # type: ignore[attr-defined]
    assert torch.equal(model.generate(ids, max_new_tokens=8, eos_token_id=[]), expected)
    stats = runtime.snapshot()
    assert stats.prefetches_issued > 0
    pending = len(runtime.cache.pending_prefetches()) if runtime.cache else 0
    # Every prefetch is used, wasted, or still waiting to be.
    assert stats.prefetches_used + stats.prefetches_wasted <= stats.prefetches_issued
    assert stats.prefetches_issued - stats.prefetches_used - stats.prefetches_wasted >= pending
    by_layer = runtime.prefetch_by_layer()
    assert sum(c.issued for c in by_layer.values()) == stats.prefetches_issued
    assert sum(c.used for c in by_layer.values()) == stats.prefetches_used
    assert sum(c.wasted for c in by_layer.values()) == stats.prefetches_wasted
    first = model.moe_blocks()[0].layer
    assert first not in by_layer  # nothing precedes the first MoE layer


def test_lookahead_prefetches_are_used_and_beat_lru_alone_on_real_routing() -> None:
    """The tiny model's own routing at a cache of a quarter of its experts (24 of 96)."""
    prompts = tiny_prompts()
    plain_model, plain = offloaded(tiny_model_path(), 24, prefetch=False)
    model, runtime = offloaded(tiny_model_path(), 24, prefetch=True)
    expected = generate_each(plain_model, plain, prompts)
    assert generate_each(model, runtime, prompts) == expected
    lru, ahead = plain.snapshot(), runtime.snapshot()
    assert ahead.prefetches_used > 0
    assert ahead.prefetches_used > ahead.prefetches_wasted  # the guesses are mostly right
    assert ahead.hit_rate >= lru.hit_rate + 0.05
    assert ahead.expert_uses == lru.expert_uses


def test_a_resident_next_layer_costs_no_guess() -> None:
    model, runtime = offloaded(tiny_model_path(), 96)  # every expert fits
    prefetcher = runtime.prefetcher
    assert isinstance(prefetcher, LookaheadPrefetcher)
    ids = [tiny_prompts()[0]]
    model.generate(ids, max_new_tokens=4, eos_token_id=[])  # fills the pool
    runtime.drain()
    for e in runtime.store.experts():  # all of them, in case the prompt missed some
        runtime.prefetch([e])
    runtime.drain()
    guesses = prefetcher.guesses
    model.generate(ids, max_new_tokens=4, eos_token_id=[])
    assert prefetcher.guesses == guesses and prefetcher.skipped_layers > 0


class Scripted:
    """A `Prefetcher` that asks for fixed experts after every layer and between steps."""

    def __init__(self, after_layer: Sequence[ExpertId], between: Sequence[ExpertId]) -> None:
        self.after_layer = list(after_layer)
        self.between = list(between)
        self.calls: list[str] = []

    def begin_layer(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                    cache: ExpertSlotCache) -> None:
        self.calls.append(f"begin {layer}")

    def end_layer(self, layer: int, cache: ExpertSlotCache) -> list[ExpertId]:
        self.calls.append(f"end {layer}")
        return self.after_layer

    def between_steps(self, cache: ExpertSlotCache) -> list[ExpertId]:
        self.calls.append("between")
        return self.between

    def begin_sequence(self) -> None:
        self.calls.append("sequence")


def test_wrong_guesses_are_counted_as_wasted() -> None:
    """A prefetcher that always asks for experts no token uses: every prefetch is wasted
    (evicted or cancelled unused), per layer too."""
    model = load_model(tiny_model_path(), dtype="float32")
    last = model.moe_blocks()[-1].layer
    with torch.no_grad():
        used: set[int] = set()

        def record(layer: int, expert_ids: torch.Tensor, weights: torch.Tensor) -> None:
            if layer == last:
                used.update(expert_ids.reshape(-1).tolist())

        for block in model.moe_blocks():
            block.observer = record
        ids = torch.tensor([[11, 12, 13]])
        model(ids)
        for block in model.moe_blocks():
            block.observer = None
    unused = [ExpertId(last, e) for e in range(16) if e not in used][:2]
    assert len(unused) == 2
    store = HostExpertStore.from_model(model, pin=False)
    pool = GpuSlotPool(store.layout, 12, device="cpu")
    scripted = Scripted(unused, [])
    assert isinstance(scripted, Prefetcher)
    runtime = install_offloading(model, store, pool, CpuCopyEngine(), prefetcher=scripted)
    with torch.no_grad():
        for _ in range(3):
            model(ids)
    stats = runtime.snapshot()
    assert stats.prefetches_issued > 0 and stats.prefetches_used == 0
    assert stats.prefetches_wasted > 0
    assert stats.prefetches_wasted == stats.prefetches_issued - len(
        [e for e in unused if not runtime.cache.is_absent(e)])  # type: ignore[union-attr]
    assert runtime.prefetch_by_layer()[last].wasted == stats.prefetches_wasted
    assert scripted.calls[:2] == [f"begin {model.moe_blocks()[0].layer}",
                                  f"end {model.moe_blocks()[0].layer}"]


def test_graph_steps_ask_the_prefetcher_between_replays_not_in_warm_up() -> None:
    model = load_model(tiny_model_path(), dtype="float32")
    store = HostExpertStore.from_model(model, pin=False)
    pool = GpuSlotPool(store.layout, 8, device="cpu")
    wanted = [ExpertId(model.moe_blocks()[0].layer, e) for e in (3, 5)]
    scripted = Scripted([], wanted)
    runtime = install_offloading(model, store, pool, CpuCopyEngine(), fetch="mapped",
                                 prefetcher=scripted)
    cache = runtime.cache
    assert cache is not None
    cache.before_warmup()
    with torch.no_grad():
        model(torch.tensor([[1, 2]]))  # a warm-up run: the prefetcher is not consulted
    cache.after_warmup()
    assert scripted.calls == []
    cache.before_replay()
    assert scripted.calls == ["between"]
    assert all(not cache.is_absent(e) for e in wanted)
    assert runtime.snapshot().prefetches_issued == 2
    runtime.begin_sequence()
    assert scripted.calls[-1] == "sequence"


def test_load_offloaded_builds_the_prefetcher_for_its_model() -> None:
    loaded = load_offloaded(tiny_model_path(), "cpu", 24 * 245_760 * 2, dtype="float32",
                            prefetcher=LookaheadPrefetcher)
    assert isinstance(loaded.runtime.prefetcher, LookaheadPrefetcher)
    loaded.model.generate([tiny_prompts()[1]], max_new_tokens=8, eos_token_id=[])
    assert loaded.runtime.snapshot().prefetches_used > 0


def test_a_prefetcher_for_streaming_is_refused() -> None:
    model = load_model(tiny_model_path(), dtype="float32")
    store = HostExpertStore.from_model(model, pin=False)
    pool = GpuSlotPool(store.layout, 8, device="cpu")
    with pytest.raises(ValueError, match="on-demand"):
        install_offloading(model, store, pool, CpuCopyEngine(), kind="streaming",
                           prefetcher=LookaheadPrefetcher(model))


def test_under_a_replayed_tape_the_lookahead_reads_the_recording() -> None:
    """A tape whose recorded lookahead names exactly the experts each step uses: every guess is
    right, so every prefetch is used (the model's own router would guess blindly here)."""
    model, runtime = offloaded(tiny_model_path(), 8, prefetch=2)
    blocks = model.moe_blocks()
    generator = torch.Generator().manual_seed(3)
    ids = torch.stack([torch.stack([torch.randperm(16, generator=generator)[:2] for _ in blocks])
                       for _ in range(12)])  # [S, L, K]
    look = torch.zeros(12, len(blocks), 16)
    look.scatter_(2, ids, 1.0)
    with replay_routing(model, RoutingTape(ids, 16, look), row_stride=1):
        model.generate([[5]], max_new_tokens=10, eos_token_id=[])
    stats = runtime.snapshot()
    assert stats.prefetches_used > 0 and stats.prefetches_wasted == 0
