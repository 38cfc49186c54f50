"""Expert parallelism on the CPU: shard plans, shard stores, the sharded executor in one process
(the ranks' partial outputs sum to the whole), and two gloo processes whose sharded MoE block and
greedy tokens equal one process's (`expert_parallel_worker.py` is each rank)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from moe_core import (
    ExpertId,
    ExpertShardPlan,
    HostExpertStore,
    LocalExperts,
    ModelSpec,
    free_port,
    generate,
    install_offloading,
    load_model,
    load_offloaded,
    make_copy_engine,
    tiny_model_path,
)
from moe_core.offload.gpu_slots import GpuSlotPool
from moe_core.parallel.expert_parallel import ExpertParallelExecutor

_WORKER = Path(__file__).with_name("expert_parallel_worker.py")
_EXPERT_BYTES = 491_520  # one float32 tiny-moe expert


# Shard plans ------------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(num_layers=st.integers(1, 4), num_experts=st.integers(1, 20), num_ranks=st.integers(1, 5),
       seed=st.integers(0, 1000))
def test_every_plan_gives_each_expert_one_owner_in_shards_of_equal_size(
        num_layers: int, num_experts: int, num_ranks: int, seed: int) -> None:
    layers = [2 * i + 1 for i in range(num_layers)]  # MoE layers need not be 0..L-1
    if num_experts < num_ranks:
        with pytest.raises(ValueError, match="would hold no expert"):
            ExpertShardPlan.round_robin(layers, num_experts, num_ranks)
        return
    counts = np.random.default_rng(seed).integers(0, 50, (num_layers, num_experts))
    for plan in (ExpertShardPlan.round_robin(layers, num_experts, num_ranks),
                 ExpertShardPlan.balanced(layers, counts, num_ranks)):
        shards = [plan.owned(r) for r in range(num_ranks)]
        every = [x for shard in shards for x in shard]
        assert sorted(every) == [ExpertId(layer, e) for layer in layers
                                 for e in range(num_experts)]  # disjoint and complete
        for layer in layers:
            sizes = [sum(x.layer == layer for x in shard) for shard in shards]
            assert max(sizes) - min(sizes) <= 1
            assert plan.owned_mask(layer, 0).tolist() == [plan.owner(ExpertId(layer, e)) == 0
                                                          for e in range(num_experts)]
    assert ExpertShardPlan.balanced(layers, counts, num_ranks) == \
        ExpertShardPlan.balanced(layers, counts, num_ranks)  # every rank computes the same


def test_balanced_plan_spreads_the_hot_experts() -> None:
    counts = np.array([[100, 90, 1, 1, 1, 1, 80, 70]])
    round_robin = ExpertShardPlan.round_robin([0], 8, 2)
    balanced = ExpertShardPlan.balanced([0], counts, 2)

    def loads(plan: ExpertShardPlan) -> list[int]:
        return [int(sum(counts[0, e] for e in range(8) if plan.owners[0][e] == r))
                for r in range(2)]

    assert loads(round_robin) == [182, 162]  # experts 0, 2, 4, 6 against 1, 3, 5, 7
    assert loads(balanced) == [172, 172]


# Shard stores -----------------------------------------------------------------------------------

def test_a_shard_store_holds_only_its_experts_with_the_same_blocks() -> None:
    net = load_model("tiny-moe", "cpu", torch.float32)
    whole = HostExpertStore.from_model(net)
    plan = ExpertShardPlan.round_robin(whole.moe_layers, whole.num_experts, 2)
    mine = plan.owned(1)
    shard = HostExpertStore.from_checkpoint(tiny_model_path(), torch.float32, experts=mine)
    assert shard.is_shard and not whole.is_shard
    assert shard.experts() == mine
    assert shard.nbytes * 2 == whole.nbytes
    other = plan.owned(0)[0]
    assert not shard.holds(other) and whole.holds(other)
    with pytest.raises(KeyError, match="shard"):
        shard.block(other)
    for copy in (shard, whole.subset(mine), HostExpertStore.from_model(net, experts=mine)):
        assert all(torch.equal(copy.block(x), whole.block(x)) for x in mine)
    pool = GpuSlotPool.for_budget(shard.layout, 4 * _EXPERT_BYTES, "cpu")
    with pytest.raises(ValueError, match="shard"):
        install_offloading(net, shard, pool, make_copy_engine("cpu"), fetch="mapped")
    runtime = install_offloading(net, shard, pool, make_copy_engine("cpu"))
    assert runtime.prefetch([other, mine[0]]) == 1  # another rank's expert is skipped


def test_load_offloaded_holds_the_shard_and_caps_its_slots() -> None:
    spec = ModelSpec.from_pretrained(tiny_model_path())
    plan = ExpertShardPlan.round_robin(list(spec.moe_layers), spec.moe.num_experts, 2)
    loaded = load_offloaded("tiny-moe", "cpu", 1 << 30, experts=plan.owned(0))
    assert loaded.runtime.store.experts() == plan.owned(0)
    assert loaded.runtime.pool.num_slots == len(plan.owned(0))  # one slot per owned expert


# The sharded executor in one process --------------------------------------------------------------

class _NoSum:
    """A collective of one rank that keeps its partial output (the test sums the ranks')."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.calls = 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        self.calls += 1


@pytest.mark.parametrize("num_ranks", [1, 2, 3])
def test_the_ranks_partial_outputs_sum_to_the_whole(num_ranks: int) -> None:
    torch.manual_seed(0)
    experts = LocalExperts(6, 16, 24)
    with torch.no_grad():
        for param in experts.parameters():
            param.normal_(0.0, 0.3)
        hidden = torch.randn(7, 16)  # [T, D]
        ids = torch.stack([torch.randperm(6)[:2] for _ in range(7)])  # [T, K]
        weights = torch.rand(7, 2)
        whole = experts(hidden, ids, weights)
        plan = ExpertShardPlan.round_robin([0], 6, num_ranks)
        parts = []
        for rank in range(num_ranks):
            collective = _NoSum(rank)
            executor = ExpertParallelExecutor(experts, plan.owned_mask(0, rank), collective)
            parts.append(executor(hidden, ids, weights))
            assert collective.calls == 1
        # A call none of whose experts this rank owns still joins the all-reduce.
        idle = _NoSum(0)
        nothing = ExpertParallelExecutor(experts, torch.zeros(6, dtype=torch.bool), idle)
        assert not nothing(hidden, ids, weights).any() and idle.calls == 1
    assert float((sum(parts) - whole).abs().max()) <= 1e-6  # type: ignore[operator]


# Two processes on gloo ----------------------------------------------------------------------------

def _worker() -> ModuleType:
    """expert_parallel_worker.py as a module (the tests are imported by path, not by name)."""
    spec = importlib.util.spec_from_file_location("expert_parallel_worker", _WORKER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_gloo_ranks_equal_one_process(tmp_path: Path) -> None:
    """The sharded MoE block's output equals the unsharded block's (float32, within 1e-6), and
    the embedded model's greedy tokens with the experts split over two ranks, each through its
    own too-small cache, equal one process's with every expert. Rank 0 runs here (on a thread,
    so a rank 1 that dies fails the test at once), rank 1 in a process of its own."""
    worker = _worker()
    prompts = worker.prompt_ids()
    port = free_port()
    out = tmp_path / "rank1.json"
    rank1 = subprocess.Popen([sys.executable, str(_WORKER), "1", "2", str(port),
                              json.dumps(prompts), str(out)], stderr=subprocess.PIPE, text=True)
    results: list[dict[str, object]] = []
    errors: list[BaseException] = []

    def rank0() -> None:
        try:
            results.append(worker.run_rank(0, 2, port, prompts))
        except BaseException as exc:  # handed to the test's thread
            errors.append(exc)

    thread = threading.Thread(target=rank0, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while thread.is_alive() and rank1.poll() in (None, 0) and time.monotonic() < deadline:
            thread.join(0.2)
        assert not thread.is_alive(), "rank 0 did not finish: " + (
            rank1.stderr.read() if rank1.poll() is not None and rank1.stderr else "")
        assert not errors, errors
        _, err = rank1.communicate(timeout=60)
        assert rank1.returncode == 0, err
    finally:
        if rank1.poll() is None:  # a failed rank 0 must not leave rank 1 waiting
            rank1.kill()
            rank1.wait()
    results.append(json.loads(out.read_text()))
    assert all(float(r["block_difference"]) <= 1e-6 for r in results)  # type: ignore[arg-type]
    assert results[0]["tokens"] == results[1]["tokens"]
    tiny = load_model("tiny-moe", "cpu", torch.float32)
    for ids, got in zip(prompts, results[0]["tokens"], strict=True):  # type: ignore[call-overload]
        result = generate(tiny, [ids], max_new_tokens=worker.MAX_NEW_TOKENS)
        assert got == result.tokens[0, : result.lengths[0]].tolist()
