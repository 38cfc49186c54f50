"""Routing set by hand for benchmarks: uniform, Zipf with re-use, and replayed tapes.

Properties measured over many draws (skew, re-use rate, distinct ids), determinism under a seed,
exact replay order through a model's forward passes, and generation through each kind.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from moe_core import (
    MoEForCausalLM,
    ReplayRouting,
    RoutingTape,
    SettingError,
    ZipfRouting,
    load_model,
    replay_routing,
    routing_for,
    tiny_model_path,
    zipf_routing,
)
from moe_core.zipf_routing import zipf_log_probs


@pytest.fixture(scope="module")
def tiny() -> MoEForCausalLM:
    return load_model(tiny_model_path(), dtype="float32")


def draws(routing: ZipfRouting, steps: int, rows: int = 4) -> torch.Tensor:
    """`[steps, rows, K]` ids of `steps` calls of `rows` tokens."""
    hidden = torch.zeros(rows, 8)
    return torch.stack([routing(hidden)[0].clone() for _ in range(steps)])


def assert_distinct(ids: torch.Tensor) -> None:
    ordered = ids.sort(dim=-1).values
    assert (ordered[..., 1:] != ordered[..., :-1]).all()


def test_zipf_shares_follow_the_law_and_the_permutation() -> None:
    torch.manual_seed(0)
    num_experts, s = 32, 1.2
    perm = torch.randperm(num_experts)
    routing = ZipfRouting(num_experts, 1, s, 0.0, perm)  # K=1: shares are the law itself
    ids = draws(routing, 2000, rows=8)
    shares = torch.bincount(ids.reshape(-1), minlength=num_experts).float() / ids.numel()
    want = zipf_log_probs(num_experts, s, perm).exp()
    assert torch.allclose(shares, want, atol=0.01)
    assert shares.argmax().item() == perm[0].item()  # rank 0 is the permutation's first expert
    top_two = shares.sort(descending=True).values[:2]
    assert top_two[0] / top_two[1] == pytest.approx(2**s, rel=0.1)  # the Zipf ratio 1 : 2^-s


@pytest.mark.parametrize("top_k", [2, 4])
def test_zipf_draws_k_distinct_experts_with_weights_summing_to_one(top_k: int) -> None:
    torch.manual_seed(1)
    routing = ZipfRouting(16, top_k, 1.5, 0.7, torch.randperm(16))
    for _ in range(200):
        ids, weights = routing(torch.zeros(5, 8))
        assert ids.shape == (5, top_k) and ids.dtype == torch.long
        assert_distinct(ids)
        assert torch.allclose(weights.sum(dim=-1), torch.ones(5))


@pytest.mark.parametrize("reuse", [0.0, 0.3, 0.8])
def test_reuse_rate_is_measurable(reuse: float) -> None:
    """With 512 uniform experts a fresh draw almost never repeats, so the share of places that
    keep their expert from the row's previous step is `reuse` (within sampling noise)."""
    torch.manual_seed(2)
    routing = ZipfRouting(512, 2, 0.0, reuse, torch.randperm(512))
    ids = draws(routing, 600)  # [S, R, K]
    kept = (ids[1:] == ids[:-1]).float().mean().item()
    assert kept == pytest.approx(reuse, abs=0.03)
    assert_distinct(ids)


def test_reuse_keeps_experts_in_place_under_heavy_skew() -> None:
    """With few experts and heavy skew, fresh draws collide with kept ones often: ids must still
    be distinct, and the overlap with the previous step is at least `reuse`."""
    torch.manual_seed(3)
    routing = ZipfRouting(6, 4, 2.0, 0.5, torch.randperm(6))
    ids = draws(routing, 400)
    assert_distinct(ids)
    same_place = (ids[1:] == ids[:-1]).float().mean().item()
    assert same_place >= 0.5 - 0.03


def test_zipf_routing_is_deterministic_under_a_seed(tiny: MoEForCausalLM) -> None:
    def run() -> list[list[int]]:
        torch.manual_seed(7)
        seen: list[list[int]] = []

        def observe(layer: int, ids: torch.Tensor, weights: torch.Tensor) -> None:
            seen.append(ids.reshape(-1).tolist())

        for block in tiny.moe_blocks():
            block.observer = observe
        try:
            with zipf_routing(tiny, s=1.0, reuse=0.5, seed=3):
                tiny.generate([[1, 2, 3]], max_new_tokens=4, eos_token_id=[])
        finally:
            for block in tiny.moe_blocks():
                block.observer = None
        return seen

    assert run() == run()


def test_each_layer_has_its_own_hot_experts(tiny: MoEForCausalLM) -> None:
    with zipf_routing(tiny, s=1.0, seed=0):
        hot = [block.routing_override.log_probs.argmax().item()  # type: ignore[union-attr]
               for block in tiny.moe_blocks()]
    assert len(set(hot)) > 1
    assert all(block.routing_override is None for block in tiny.moe_blocks())  # put back


def test_replayed_tape_is_read_in_order_one_step_per_forward_pass(tiny: MoEForCausalLM) -> None:
    blocks = tiny.moe_blocks()
    num_experts, top_k = blocks[0].spec.num_experts, blocks[0].spec.router.top_k
    generator = torch.Generator().manual_seed(0)
    steps = 9
    source = torch.stack([torch.stack([torch.randperm(num_experts, generator=generator)[:top_k]
                                       for _ in blocks]) for _ in range(steps)])  # [S, L, K]
    tape = RoutingTape(source, num_experts)
    fitted = tape.mapped(len(blocks), num_experts, top_k, seed=5)
    seen: dict[int, list[list[int]]] = {b.layer: [] for b in blocks}

    def observe(layer: int, ids: torch.Tensor, weights: torch.Tensor) -> None:
        seen[layer].append(ids[-1].tolist())  # the last token: batch 1, one row

    for block in blocks:
        block.observer = observe
    try:
        with replay_routing(tiny, tape, seed=5, row_stride=1):
            tiny.generate([[5, 6, 7, 8]], max_new_tokens=6, eos_token_id=[])
    finally:
        for block in blocks:
            block.observer = None
    for row, block in enumerate(blocks):
        calls = seen[block.layer]
        assert len(calls) == 6  # prefill + 5 decode steps
        # call c's last token (prompt token 3 at the prefill) reads step (c + 3) for the
        # prefill, step c for decode steps (one token)
        assert calls[0] == fitted.ids[3, row].tolist()
        for c in range(1, 6):
            assert calls[c] == fitted.ids[c % steps, row].tolist()


def test_mapping_a_tape_onto_a_bigger_model_is_injective_and_keeps_reuse() -> None:
    generator = torch.Generator().manual_seed(1)
    source = torch.stack([torch.stack([torch.randperm(16, generator=generator)[:2]
                                       for _ in range(3)]) for _ in range(50)])  # [50, 3, 2]
    tape = RoutingTape(source, 16)
    fitted = tape.mapped(num_layers=7, num_experts=128, top_k=8, seed=0)
    assert fitted.ids.shape == (50, 7, 8)
    assert_distinct(fitted.ids)
    for j in range(7):
        src = source[:, j % 3]
        # same source experts <-> same target experts (as sets), step by step
        for a in range(0, 50, 7):
            for b in range(0, 50, 5):
                same_source = set(src[a].tolist()) == set(src[b].tolist())
                same_target = set(fitted.ids[a, j].tolist()) == set(fitted.ids[b, j].tolist())
                assert same_source == same_target
    assert not torch.equal(fitted.ids[:, 0], fitted.ids[:, 3])  # cycled layers, own permutation


def test_mapping_onto_fewer_experts_keeps_ids_distinct() -> None:
    source = torch.tensor([[[0, 8], [3, 11]], [[5, 13], [1, 2]]])  # collide modulo 8
    fitted = RoutingTape(source, 16).mapped(num_layers=2, num_experts=8, top_k=3)
    assert_distinct(fitted.ids)
    assert int(fitted.ids.max()) < 8


def test_bad_tapes_are_refused() -> None:
    with pytest.raises(ValueError, match="repeat"):
        RoutingTape(torch.tensor([[[1, 1]]]), 4)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        RoutingTape(torch.tensor([[[1, 4]]]), 4)
    with pytest.raises(ValueError, match="int64"):
        RoutingTape(torch.tensor([[[1, 2]]], dtype=torch.int32), 4)


def test_replay_rows_of_a_batch_read_their_own_stretch() -> None:
    routing = ReplayRouting(torch.arange(20).reshape(10, 2), row_stride=3)
    first, _ = routing(torch.zeros(3, 4))
    second, _ = routing(torch.zeros(3, 4))
    assert first[:, 0].tolist() == [0, 6, 12]  # steps 0, 3, 6
    assert second[:, 0].tolist() == [2, 8, 14]  # steps 1, 4, 7
    routing.rewind()
    assert routing(torch.zeros(1, 4))[0].tolist() == [[0, 1]]


@pytest.mark.parametrize("spec", ["uniform", "zipf:s=1.2,reuse=0.6", "zipf", "replay:x.bin"])
def test_generate_runs_under_each_routing(tiny: MoEForCausalLM, spec: str) -> None:
    tape = RoutingTape(torch.tensor([[[0, 1]] * 6, [[2, 3]] * 6]), 16)

    def loader(path: Path) -> RoutingTape:
        assert path == Path("x.bin")
        return tape

    torch.manual_seed(0)
    with routing_for(tiny, spec, tape_loader=loader):
        assert all(b.routing_override is not None for b in tiny.moe_blocks())
        out = tiny.generate([[1, 2, 3], [4, 5, 6]], max_new_tokens=5, eos_token_id=[])
    assert out.shape == (2, 5)
    assert all(b.routing_override is None for b in tiny.moe_blocks())


@pytest.mark.parametrize(("spec", "message"), [
    ("zipf:s=-1", "s must be"), ("zipf:q=1", "unknown parameter"), ("zipf:s=x", "number"),
    ("gauss", "expected uniform"), ("replay:", "expected uniform"),
])
def test_bad_routing_specs_are_one_clear_error(tiny: MoEForCausalLM, spec: str,
                                               message: str) -> None:
    with pytest.raises(SettingError, match=message):
        routing_for(tiny, spec)


@pytest.mark.gpu
def test_zipf_and_replay_routing_replay_inside_a_captured_graph() -> None:
    """Captured once, each replay draws afresh (Zipf) or reads the next step (replay)."""
    hidden = torch.zeros(1, 8, device="cuda")
    zipf = ZipfRouting(64, 4, 1.0, 0.0, torch.randperm(64), "cuda")
    replay = ReplayRouting(torch.arange(40).reshape(20, 2), device="cuda")
    zipf(hidden), replay(hidden)  # warm-up: the memory of the previous step exists
    replay.rewind()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        z_ids, _ = zipf(hidden)
        r_ids, _ = replay(hidden)
    replay.rewind()
    seen_z, seen_r = [], []
    for _ in range(5):
        graph.replay()
        seen_z.append(z_ids.clone())
        seen_r.append(r_ids[0, 0].item())
    assert seen_r == [0, 2, 4, 6, 8]
    assert len({tuple(x.tolist()[0]) for x in seen_z}) > 1


def test_a_tape_lookahead_is_mapped_with_its_experts_and_replayed_ahead() -> None:
    ids = torch.tensor([[[0, 1]], [[2, 3]], [[1, 2]]])  # [S=3, L=1, K=2]
    look = torch.zeros(3, 1, 4)
    look[0, 0, 3], look[1, 0, 0], look[2, 0, 2] = 0.9, 0.8, 0.7
    fitted = RoutingTape(ids, 4, look).mapped(num_layers=2, num_experts=16, top_k=4, seed=1)
    assert fitted.lookahead is not None and fitted.lookahead.shape == (3, 2, 16)
    for j in range(2):
        perm_of = {}  # source expert -> its target group, read off the mapped ids
        for s in range(3):
            for e, group in zip(ids[s, 0].tolist(), fitted.ids[s, j].view(2, 2).tolist(),
                                strict=True):
                perm_of[e] = set(group)
        for s, e in ((0, 3), (1, 0), (2, 2)):
            best = set(torch.nonzero(fitted.lookahead[s, j] == fitted.lookahead[s, j].max())
                       .reshape(-1).tolist())
            assert best == perm_of[e]
    routing = ReplayRouting(fitted.ids[:, 0], row_stride=1, lookahead=fitted.lookahead[:, 0])
    hidden = torch.zeros(1, 4)
    for s in range(3):  # asked before the call: the step the call will replay
        scores = routing.lookahead_scores(hidden)
        assert scores is not None and torch.equal(scores[0], fitted.lookahead[s, 0])
        routing(hidden)


def test_zipf_lookahead_ranks_held_experts_then_popular_ones() -> None:
    torch.manual_seed(0)
    perm = torch.randperm(32)
    routing = ZipfRouting(32, 2, 1.5, 0.6, perm)
    hidden = torch.zeros(3, 4)
    ids, _ = routing(hidden)
    scores = routing.lookahead_scores(hidden)
    assert scores.shape == (3, 32)
    for row in range(3):
        held = set(ids[row].tolist())
        top = set(scores[row].topk(2).indices.tolist())
        assert top == held  # reuse 0.6 outweighs any fresh share
        others = [e for e in perm.tolist() if e not in held]
        assert scores[row, others[0]] >= scores[row, others[-1]]
