"""`LocalExperts`: the gather path (few tokens) and the grouped path (many) compute the same sum,
and both equal a plain per-token loop (CPU, fp32)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from moe_core import LocalExperts, load_model
from moe_core.gathered_experts import gathered_experts, use_gather

E, D, W = 5, 12, 7  # experts, hidden, expert width


def experts(seed: int = 0) -> LocalExperts:
    module = LocalExperts(E, D, W)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    return module


def per_token(module: LocalExperts, hidden: torch.Tensor, ids: torch.Tensor,
              weights: torch.Tensor) -> torch.Tensor:
    rows = []
    for t in range(hidden.shape[0]):
        acc = torch.zeros(D)
        for e, w in zip(ids[t].tolist(), weights[t], strict=True):
            g = F.linear(hidden[t], module.gate_proj[e])
            u = F.linear(hidden[t], module.up_proj[e])
            acc += w * F.linear(F.silu(g) * u, module.down_proj[e])
        rows.append(acc)
    return torch.stack(rows)


@settings(max_examples=30, deadline=None)
@given(tokens=st.integers(1, 9), k=st.integers(1, 3), seed=st.integers(0, 10_000))
def test_gather_and_grouped_paths_equal_the_per_token_sum(tokens: int, k: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, D, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(tokens)])  # [T, K]
    weights = torch.rand(tokens, k, generator=g)
    module = experts(seed % 3)
    expected = per_token(module, hidden, ids, weights)
    with torch.no_grad():
        gathered = module(hidden, ids, weights)
        module.gather_limit_bytes = 0
        grouped = module(hidden, ids, weights)
    # fp32 sums in different orders: tolerances relative to the output's scale (values ~1e2)
    atol = 1e-5 * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(gathered, expected, rtol=1e-5, atol=atol)
    torch.testing.assert_close(grouped, expected, rtol=1e-5, atol=atol)


def test_gather_limit_is_in_bytes_of_gathered_blocks() -> None:
    assert use_gather(8, 1_000, 8_000) and not use_gather(9, 1_000, 8_000)


def test_gather_works_on_strided_views_of_a_pool() -> None:
    pool = torch.randn(3, 3 * W * D)  # three slots, gate | up | down each
    gate = pool[:, : W * D].view(3, W, D)
    up = pool[:, W * D : 2 * W * D].view(3, W, D)
    down = pool[:, 2 * W * D :].view(3, D, W)
    module = LocalExperts(3, D, W)
    with torch.no_grad():
        module.gate_proj.copy_(gate)
        module.up_proj.copy_(up)
        module.down_proj.copy_(down)
    hidden, ids, weights = torch.randn(4, D), torch.tensor([[0, 2], [1, 0], [2, 2], [1, 1]]), \
        torch.rand(4, 2)
    torch.testing.assert_close(gathered_experts(hidden, ids, weights, gate, up, down),
                               per_token(module, hidden, ids, weights), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("limit", [0, None])
def test_the_embedded_model_is_the_same_on_both_paths(limit: int | None) -> None:
    model = load_model("tiny-moe", dtype="float32")
    ids = torch.arange(1, 40).view(3, 13)
    expected = model(ids)
    if limit is not None:
        for block in model.moe_blocks():
            block.experts.gather_limit_bytes = limit
    # Six layers of fp32 reassociation (index_add vs a K-sum) move logits by ~1e-5.
    torch.testing.assert_close(model(ids), expected, rtol=1e-4, atol=1e-4)
