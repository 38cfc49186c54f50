"""The activation-aware policy and prefetcher in moe-core's real offload runtime, found through
entry points, and trace files replayed as benchmark routing.

CPU, fp32: the embedded tiny model (its real routing) and a tiny DeepSeek-V3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import moe_core
import numpy as np
import pytest
import torch
from moe_core import (
    CachePlan,
    CpuCopyEngine,
    GpuSlotPool,
    HostExpertStore,
    ModelSpec,
    MoEForCausalLM,
    OffloadRuntime,
    cache_plan,
    install_offloading,
    load_model,
    routing_for,
)
from moe_infinity import (
    ActivationAwarePolicy,
    ActivationPrefetcher,
    OnlineRecall,
    TraceFileError,
    TraceSet,
    activation_plan,
    load_routing_tape,
    routing_tape,
    save_traces,
)

PROMPTS = ["Once upon a time, there was a little fox who", "def fibonacci(n):",
           "Der kleine Hund lief schnell nach Hause, weil"]


def offloaded(folder: Path, num_slots: int, policy: str, prefetch: str
              ) -> tuple[MoEForCausalLM, OffloadRuntime]:
    """A fresh fp32 CPU model offloaded into `num_slots` slots under the named plan."""
    model = load_model(folder, dtype="float32")
    plan = cache_plan(policy, prefetch, model.spec)
    store = HostExpertStore.from_model(model, pin=False)
    pool = GpuSlotPool(store.layout, num_slots, device="cpu")
    runtime = install_offloading(
        model, store, pool, CpuCopyEngine(), plan.policy,
        prefetcher=plan.prefetcher(model) if plan.prefetcher is not None else None)
    return model, runtime


def generate_each(model: MoEForCausalLM, runtime: OffloadRuntime, prompts: list[list[int]],
                  new_tokens: int = 16) -> list[list[int]]:
    out = []
    for ids in prompts:
        runtime.begin_sequence()
        out.append(model.generate([ids], max_new_tokens=new_tokens, eos_token_id=[])[0].tolist())
    return out


@pytest.fixture(scope="module")
def prompts(tokenizer: object) -> list[list[int]]:
    return [tokenizer(p)["input_ids"] for p in PROMPTS]  # type: ignore[operator]


def test_the_entry_points_are_installed_and_resolve() -> None:
    policies = {ep.name: ep for ep in entry_points(group="moe_core.policies")}
    tapes = {ep.name: ep for ep in entry_points(group="moe_core.routing_tapes")}
    assert policies["activation"].load() is activation_plan
    assert tapes["traces"].load() is load_routing_tape
    spec = ModelSpec.from_pretrained(moe_core.tiny_model_path())
    plan = cache_plan("activation", "lookahead", spec)  # moe-core finds it by name
    assert isinstance(plan, CachePlan) and isinstance(plan.policy, ActivationAwarePolicy)


@pytest.mark.parametrize("prefetch", ["none", "lookahead", "lookahead:top=4"])
def test_greedy_tokens_are_unchanged_under_the_activation_plan(prefetch: str,
                                                              tmp_path: Path) -> None:
    for folder in (moe_core.tiny_model_path(),
                   moe_core.build_tiny_checkpoint("deepseek_v3", tmp_path / "dsv3")):
        reference = load_model(folder, dtype="float32")
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, reference.spec.vocab_size, (2, 6), generator=generator)
        expected = reference.generate(ids, max_new_tokens=8, eos_token_id=[])
        model, runtime = offloaded(folder, 3 * reference.spec.moe.router.top_k, "activation",
                                   prefetch)
        assert torch.equal(model.generate(ids, max_new_tokens=8, eos_token_id=[]), expected)
        stats = runtime.snapshot()
        assert (stats.prefetches_issued > 0) == (prefetch != "none")


def test_activation_with_lookahead_beats_lru_on_real_routing(tiny: MoEForCausalLM,
                                                             prompts: list[list[int]]) -> None:
    """A cache of a quarter of the tiny model's experts (24 of 96), its own routing."""
    folder = moe_core.tiny_model_path()
    lru_model, lru = offloaded(folder, 24, "lru", "none")
    model, runtime = offloaded(folder, 24, "activation", "lookahead")
    assert generate_each(model, runtime, prompts) == generate_each(lru_model, lru, prompts)
    base, aware = lru.snapshot(), runtime.snapshot()
    assert aware.expert_uses == base.expert_uses
    assert aware.prefetches_used > 0
    assert aware.hit_rate > base.hit_rate + 0.03


def test_the_policy_is_fed_live_and_the_collection_learns(prompts: list[list[int]]) -> None:
    model, runtime = offloaded(moe_core.tiny_model_path(), 24, "activation", "lookahead")
    prefetcher = runtime.prefetcher
    assert isinstance(prefetcher, ActivationPrefetcher)
    policy = prefetcher.policy
    generate_each(model, runtime, prompts[:2], new_tokens=6)
    assert runtime.cache is not None and runtime.cache.table.policy is policy
    layers = [b.layer for b in model.moe_blocks()]
    need = np.array([[policy.need_of(moe_core.ExpertId(layer, e)) for e in range(16)]
                     for layer in layers])
    assert need.sum() > 0  # the predictor's need reached the policy
    assert len(prefetcher.collection) == 1  # the first request is over; the second runs
    runtime.begin_sequence()
    assert len(prefetcher.collection) == 2 and prefetcher.requests == 2


def test_a_prefill_after_decode_steps_starts_a_new_request(prompts: list[list[int]]) -> None:
    model, runtime = offloaded(moe_core.tiny_model_path(), 24, "activation", "none")
    prefetcher = runtime.prefetcher
    assert isinstance(prefetcher, ActivationPrefetcher)
    for ids in prompts:  # no begin_sequence: the prefill's size tells
        model.generate([ids], max_new_tokens=4, eos_token_id=[])
    assert prefetcher.requests == len(prompts) and len(prefetcher.collection) == 2


def test_a_saved_collection_seeds_the_plan(sample_traces: TraceSet, tmp_path: Path) -> None:
    from moe_infinity import TraceCollection

    spec = ModelSpec.from_pretrained(moe_core.tiny_model_path())
    collection = TraceCollection(sample_traces.shape, 64)
    for trace in sample_traces:
        collection.add(trace.eam)
    path = collection.save(tmp_path / "past.bin")
    plan = activation_plan(spec, prefetch="lookahead", options={"collection": str(path)})
    model = load_model(moe_core.tiny_model_path(), dtype="float32")
    assert plan.prefetcher is not None
    prefetcher = plan.prefetcher(model)
    assert isinstance(prefetcher, ActivationPrefetcher)
    assert len(prefetcher.collection) == len(sample_traces)


@pytest.mark.parametrize(("options", "prefetch", "message"), [
    ({"colour": "red"}, "none", "unknown option 'colour'"),
    ({"learn": "yes"}, "none", "learn must be 0 or 1"),
    ({"capacity": "0"}, "none", "capacity must be a positive integer"),
    ({}, "lookahead:top=99", "lookahead:top must be in"),
    ({"collection": "/no/such/file.bin"}, "none", "/no/such/file.bin"),
])
def test_bad_activation_options_are_one_clear_error(options: dict[str, str], prefetch: str,
                                                    message: str) -> None:
    spec = ModelSpec.from_pretrained(moe_core.tiny_model_path())
    with pytest.raises(moe_core.MoEError, match=message):
        activation_plan(spec, prefetch=prefetch, options=options)


def test_moe_core_generate_takes_policy_activation() -> None:
    """The installed `moe-core` command, as a user runs it (moe-core finds the plan by name)."""
    command = [str(Path(sys.executable).with_name("moe-core")), "generate", "-p", PROMPTS[0],
               "--max-new-tokens", "12", "--json", "--expert-memory", "11MiB", "--stats"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    lru = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    aware = subprocess.run([*command, "--policy", "activation", "--prefetch", "lookahead"],
                           capture_output=True, text=True, env=env, check=False)
    assert lru.returncode == 0 and aware.returncode == 0, aware.stderr
    assert json.loads(aware.stdout)["text"] == json.loads(lru.stdout)["text"]
    assert "prefetches_used" in aware.stderr and "prefetches by layer" in aware.stderr


def test_trace_files_replay_as_routing_through_the_installed_loader(
        tiny: MoEForCausalLM, sample_traces: TraceSet, tmp_path: Path) -> None:
    path = save_traces(sample_traces, tmp_path / "traces.bin")
    tape = load_routing_tape(path)
    decode_steps = sum(t.num_steps - 1 for t in sample_traces)
    assert tape.ids.shape == (decode_steps, 6, 2) and tape.num_experts == 16
    first = sample_traces.traces[0]
    assert tape.ids[0].tolist() == [first.experts_at(1, row).tolist() for row in range(6)]
    fitted = tape.mapped(6, 16, 2, seed=0)
    seen: list[list[int]] = []

    def observe(layer: int, ids: torch.Tensor, weights: torch.Tensor) -> None:
        if layer == tiny.moe_blocks()[0].layer:
            seen.append(sorted(ids[-1].tolist()))

    block = tiny.moe_blocks()[0]
    block.observer = observe
    try:
        with routing_for(tiny, f"replay:{path}"):  # the entry point reads the file
            tiny.generate([[1, 2]], max_new_tokens=5, eos_token_id=[])
    finally:
        block.observer = None
    stride = max(1, decode_steps // 64)
    assert seen[0] == sorted(fitted.ids[stride, 0].tolist())  # prefill's last token: row 1
    assert seen[1:] == [sorted(fitted.ids[c, 0].tolist()) for c in range(1, 5)]


def test_a_trace_without_decode_steps_is_refused(sample_traces: TraceSet, tmp_path: Path
                                                  ) -> None:
    prefill_only = [type(t)(t.request_id, t.domain, t.step_counts[:1], t.lookahead[:1],
                            t.step_tokens[:1]) for t in sample_traces.traces[:2]]
    with pytest.raises(ValueError, match="no decode step"):
        routing_tape(TraceSet(sample_traces.shape, prefill_only))
    path = save_traces(TraceSet(sample_traces.shape, prefill_only), tmp_path / "p.bin")
    with pytest.raises(TraceFileError, match="no decode step"):
        load_routing_tape(path)


def test_online_recall_weights_each_source_by_what_it_foresaw() -> None:
    recall = OnlineRecall(budget=2)
    assert recall.weights() == (0.5, 0.5, 0.5)  # the prior
    used = np.array([0, 3, 0, 1, 0, 0])  # experts 1 and 3
    for _ in range(20):
        recall.update({"trace": np.array([0, 0.5, 0, 0.5, 0, 0]),  # both right
                       "lookahead": np.array([0.9, 0.1, 0, 0, 0, 0]),  # one of two
                       "own": np.zeros(6)}, used)  # no prediction: not scored
    trace, lookahead, own = recall.weights()
    assert trace == pytest.approx(41 / 42) and lookahead == pytest.approx(21 / 42)
    assert own == 0.5


def test_the_live_prefetcher_calibrates_its_mixing_weights(prompts: list[list[int]]) -> None:
    model, runtime = offloaded(moe_core.tiny_model_path(), 24, "activation", "lookahead")
    prefetcher = runtime.prefetcher
    assert isinstance(prefetcher, ActivationPrefetcher) and prefetcher.recall is not None
    generate_each(model, runtime, prompts[:2], new_tokens=12)
    _, lookahead, own = prefetcher.config.weights
    assert prefetcher.config.weights == prefetcher.recall.weights()
    assert lookahead > 0.6  # the tiny model's lookahead foresees ~78% (docs/moe-infinity.md)
    assert lookahead > own


def test_between_graph_steps_it_prefetches_from_the_prefill(prompts: list[list[int]]) -> None:
    """The mapped path (what decode graphs capture): after an eager prefill, the replay hook
    asks the prefetcher, which prefetches each layer's most needed absent experts."""
    model = load_model(moe_core.tiny_model_path(), dtype="float32")
    plan = cache_plan("activation", "lookahead", model.spec)
    store = HostExpertStore.from_model(model, pin=False)
    pool = GpuSlotPool(store.layout, 24, device="cpu")
    assert plan.prefetcher is not None
    prefetcher = plan.prefetcher(model)
    runtime = install_offloading(model, store, pool, CpuCopyEngine(), plan.policy,
                                 fetch="mapped", prefetcher=prefetcher)
    assert runtime.cache is not None
    assert prefetcher.between_steps(runtime.cache) == []  # nothing observed yet
    with torch.no_grad():
        model(torch.tensor([prompts[0]]))  # the prefill, eager
    before = runtime.snapshot().prefetches_issued
    runtime.cache.before_replay()
    issued = runtime.snapshot().prefetches_issued - before
    assert 0 < issued <= 2 * len(model.moe_blocks())
    runtime.cache.before_replay()  # nothing new was observed: nothing more to fetch
    assert runtime.snapshot().prefetches_issued - before == issued
