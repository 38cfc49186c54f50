"""`route` against a plain reference written from the papers' definitions, and `RouterSpec`'s
validation.

The reference works one token at a time in float64 Python: score every expert, rank groups,
rank the experts of the kept groups, read off the weights. It shares no code with `route`.

Ties make "the top k" ambiguous, so the logits are drawn distinct (a random permutation of ranks,
jittered and scaled), and cases whose group or expert boundary lies within 1e-4 are discarded.

Dimension key: T tokens, E routed experts, K experts per token, N expert groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from moe_core import MoESpec, RouterSpec, route

MIN_MARGIN = 1e-4  # closest allowed gap at a selection boundary (float32 noise is ~1e-7)
ATOL = 1e-6

PROPERTY_SETTINGS = settings(max_examples=50, deadline=None)


# --- The reference ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ReferenceChoice:
    """One token's routing by the book.

    Attributes:
        weights: Chosen expert -> weight.
        kept_groups: Groups the token may draw from.
        margin: Smallest gap at a boundary (last kept group vs first dropped; K-th expert vs
            the next candidate), in the space the choice is made in.
    """

    weights: dict[int, float]
    kept_groups: frozenset[int]
    margin: float


def _top(items: list[int], key: list[float], n: int) -> tuple[list[int], float]:
    """The `n` items of largest `key`, and the gap between the n-th and the next one."""
    ranked = sorted(items, key=lambda i: key[i], reverse=True)
    gap = key[ranked[n - 1]] - key[ranked[n]] if n < len(ranked) else math.inf
    return ranked[:n], gap


def reference_route(logits: list[float], spec: RouterSpec,
                    bias: list[float] | None) -> ReferenceChoice:
    """Route one token's `logits` `[E]` as the papers define it."""
    num_experts = len(logits)
    if spec.method == "noaux_tc":
        # DeepSeek-V3 §2.1.2: s_i = sigmoid(u_i); choose on s_i + b_i, weigh with s_i.
        scores = [1.0 / (1.0 + math.exp(-u)) for u in logits]
        choice_key = [s + (bias[i] if bias else 0.0) for i, s in enumerate(scores)]
    else:
        # Softmax over all experts. It is monotone, so ranking the logits ranks the
        # probabilities; the logits give the true (unrounded) margin.
        top = max(logits)
        exp = [math.exp(u - top) for u in logits]
        scores = [e / sum(exp) for e in exp]
        choice_key = list(logits)

    size = num_experts // spec.num_groups
    members = [list(range(g * size, (g + 1) * size)) for g in range(spec.num_groups)]
    margin = math.inf
    if spec.method == "group_limited_greedy":
        # DeepSeek-V2 §2.1.2: a group is as good as its best expert.
        group_key = [max(choice_key[e] for e in m) for m in members]
    elif spec.method == "noaux_tc" and spec.num_groups > 1:
        # DeepSeek-V3: a group scores the sum of its two best biased affinities.
        group_key = [sum(sorted((choice_key[e] for e in m), reverse=True)[:2]) for m in members]
    else:
        group_key = [0.0] * spec.num_groups
    if spec.method != "softmax_topk" and spec.num_groups > 1:
        kept, margin = _top(list(range(spec.num_groups)), group_key, spec.topk_groups)
    else:
        kept = list(range(spec.num_groups))

    candidates = [e for g in kept for e in members[g]]
    chosen, expert_gap = _top(candidates, choice_key, spec.top_k)
    weights = [scores[e] for e in chosen]
    if spec.normalize:
        weights = [w / sum(weights) for w in weights]
    return ReferenceChoice(
        weights={e: w * spec.scaling_factor for e, w in zip(chosen, weights, strict=True)},
        kept_groups=frozenset(kept),
        margin=min(margin, expert_gap),
    )


# --- Strategies -------------------------------------------------------------------------------


@st.composite
def distinct_logits(draw: st.DrawFn, num_tokens: int, num_experts: int,
                    span: float) -> torch.Tensor:
    """`[T, E]` logits within about ±span/2, every row's values at least 0.5 * spacing apart:
    the ranks are a random permutation, each jittered by less than half a step."""
    rows = []
    for _ in range(num_tokens):
        ranks = draw(st.permutations(range(num_experts)))
        spacing = draw(st.floats(0.05, span / num_experts))
        jitter = draw(st.lists(st.floats(0.0, 0.5), min_size=num_experts, max_size=num_experts))
        centred = [r + j - num_experts / 2 for r, j in zip(ranks, jitter, strict=True)]
        rows.append([c * spacing for c in centred])
    return torch.tensor(rows, dtype=torch.float32)


@dataclass(frozen=True)
class RoutingCase:
    logits: torch.Tensor  # [T, E]
    spec: RouterSpec
    bias: torch.Tensor | None  # [E]


@st.composite
def routing_cases(draw: st.DrawFn, method: str, grouped: bool) -> RoutingCase:
    """A valid router, logits and (for `noaux_tc`, sometimes) a score bias."""
    if grouped:
        num_groups = draw(st.sampled_from([2, 4, 8]))
        # DeepSeek-V3's group score needs two experts per group.
        group_size = draw(st.integers(2 if method == "noaux_tc" else 1, 6))
    else:
        num_groups, group_size = 1, draw(st.integers(2, 24))
    num_experts = num_groups * group_size
    topk_groups = draw(st.integers(1, num_groups))
    spec = RouterSpec(
        method,  # type: ignore[arg-type]
        top_k=draw(st.integers(1, topk_groups * group_size)),
        normalize=draw(st.booleans()),
        scaling_factor=draw(st.sampled_from([1.0, 2.5]) | st.floats(0.1, 16.0)),
        num_groups=num_groups,
        topk_groups=topk_groups,
    )
    # Sigmoid flattens beyond |u| ~ 4, where float32 would start rounding distinct scores
    # together; softmax ranks by logits, so it can take a wider range.
    span = 8.0 if method == "noaux_tc" else 24.0
    logits = draw(distinct_logits(draw(st.integers(1, 4)), num_experts, span))
    bias = None
    if method == "noaux_tc" and draw(st.booleans()):
        values = draw(st.lists(st.floats(-0.3, 0.3), min_size=num_experts, max_size=num_experts))
        bias = torch.tensor(values, dtype=torch.float32)
    return RoutingCase(logits, spec, bias)


ROUTERS = [
    pytest.param("softmax_topk", False, id="softmax_topk"),
    pytest.param("group_limited_greedy", True, id="group_limited_greedy"),
    pytest.param("noaux_tc", False, id="noaux_tc-ungrouped"),
    pytest.param("noaux_tc", True, id="noaux_tc-grouped"),
]


# --- Properties -------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "grouped"), ROUTERS)
@PROPERTY_SETTINGS
@given(data=st.data())
def test_route_matches_the_reference(method: str, grouped: bool, data: st.DataObject) -> None:
    case = data.draw(routing_cases(method, grouped))
    spec = case.spec
    bias_list = case.bias.tolist() if case.bias is not None else None
    expected = [reference_route(row, spec, bias_list) for row in case.logits.double().tolist()]
    assume(min(e.margin for e in expected) > MIN_MARGIN)

    ids, weights = route(case.logits, spec, case.bias)

    t = case.logits.shape[0]
    assert ids.shape == weights.shape == (t, spec.top_k)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
    size = case.logits.shape[1] // spec.num_groups
    for row, ref in enumerate(expected):
        got = dict(zip(ids[row].tolist(), weights[row].tolist(), strict=True))
        assert len(got) == spec.top_k, "an expert was chosen twice"
        assert set(got) == set(ref.weights)
        for expert, weight in ref.weights.items():
            assert got[expert] == pytest.approx(weight, abs=ATOL * spec.scaling_factor)
        # Every chosen expert lies in one of the token's kept groups.
        groups = {e // size for e in got}
        assert groups <= ref.kept_groups and len(groups) <= spec.topk_groups
    if spec.normalize:
        assert torch.allclose(weights.sum(-1), torch.full((t,), spec.scaling_factor), rtol=1e-6)
    else:  # a subset of probabilities (or of sigmoids below 1): never more than K * scaling
        bound = 1.0 if method != "noaux_tc" else spec.top_k
        assert bool((weights.sum(-1) <= bound * spec.scaling_factor * (1 + 1e-6)).all())


@PROPERTY_SETTINGS
@given(data=st.data(), grouped=st.booleans())
def test_noaux_tc_bias_moves_the_choice_not_the_weight_formula(data: st.DataObject,
                                                               grouped: bool) -> None:
    case = data.draw(routing_cases("noaux_tc", grouped))
    spec = RouterSpec("noaux_tc", top_k=case.spec.top_k, normalize=False,
                      scaling_factor=case.spec.scaling_factor, num_groups=case.spec.num_groups,
                      topk_groups=case.spec.topk_groups)
    bias = torch.randn(case.logits.shape[1], generator=torch.Generator().manual_seed(0))

    for b in (None, bias):
        ids, weights = route(case.logits, spec, b)
        # Whatever the bias picked, each weight is the expert's own, unbiased sigmoid.
        unbiased = case.logits.sigmoid().gather(1, ids) * spec.scaling_factor
        torch.testing.assert_close(weights, unbiased, rtol=1e-6, atol=1e-7)


# --- Worked examples --------------------------------------------------------------------------


def test_softmax_topk_weights_by_hand() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0]]).log()  # softmax: 0.1, 0.2, 0.3, 0.4
    plain = RouterSpec("softmax_topk", top_k=2, normalize=False)
    ids, weights = route(logits, plain)
    assert ids.tolist() == [[3, 2]]
    torch.testing.assert_close(weights, torch.tensor([[0.4, 0.3]]))
    # Renormalised over the chosen two (Mixtral), then scaled: 2.5 * (4/7, 3/7).
    scaled = RouterSpec("softmax_topk", top_k=2, normalize=True, scaling_factor=2.5)
    _, weights = route(logits, scaled)
    torch.testing.assert_close(weights, torch.tensor([[2.5 * 4 / 7, 2.5 * 3 / 7]]))


def test_group_scores_are_max_for_v2_and_top2_sum_for_v3() -> None:
    # Group 0 has one strong expert and one very weak; group 1 has two good ones.
    logits = torch.tensor([[3.0, -6.0, 1.0, 0.9]])
    # V2 (max): group 0 wins on its 3.0 expert, so both its experts are taken.
    v2 = RouterSpec("group_limited_greedy", top_k=2, normalize=False, num_groups=2, topk_groups=1)
    ids, weights = route(logits, v2)
    assert set(ids[0].tolist()) == {0, 1}
    torch.testing.assert_close(weights[0].sort().values,
                               logits.softmax(-1)[0, [1, 0]])  # raw probabilities
    # V3 (sum of top two sigmoids): group 0 has 0.953 + 0.002, group 1 has 0.731 + 0.711.
    v3 = RouterSpec("noaux_tc", top_k=2, normalize=False, num_groups=2, topk_groups=1)
    ids, _ = route(logits, v3)
    assert set(ids[0].tolist()) == {2, 3}


def test_v3_group_score_uses_the_biased_scores() -> None:
    logits = torch.tensor([[1.0, 0.9, 3.0, -6.0]])
    v3 = RouterSpec("noaux_tc", top_k=1, normalize=False, num_groups=2, topk_groups=1)
    ids, _ = route(logits, v3)
    assert ids.tolist() == [[0]]  # group 0 (0.731 + 0.711) beats group 1 (0.953 + 0.002)
    # +0.6 on expert 3 lifts group 1 to 0.953 + 0.602 = 1.555 > 1.442 (without making
    # expert 3 the best): the group choice flips, and with it the expert.
    bias = torch.tensor([0.0, 0.0, 0.0, 0.6])
    ids, weights = route(logits, v3, bias)
    assert ids.tolist() == [[2]]
    torch.testing.assert_close(weights, torch.tensor([[3.0]]).sigmoid())


def test_v3_bias_picks_a_weak_expert_and_keeps_its_weak_weight() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    spec = RouterSpec("noaux_tc", top_k=2, normalize=False, scaling_factor=2.0)
    ids, weights = route(logits, spec, torch.tensor([0.0, 0.0, 0.0, 5.0]))
    assert set(ids[0].tolist()) == {0, 3}
    got = dict(zip(ids[0].tolist(), weights[0].tolist(), strict=True))
    assert got[3] == pytest.approx(2.0 / (1 + math.e), rel=1e-6)  # 2 * sigmoid(-1), no bias
    assert got[0] == pytest.approx(2.0 / (1 + math.exp(-2.0)), rel=1e-6)


def test_v3_normalises_before_scaling() -> None:
    logits = torch.tensor([[0.0, 0.0, -20.0, -20.0]])  # two experts at sigmoid 0.5
    spec = RouterSpec("noaux_tc", top_k=2, normalize=True, scaling_factor=2.5)
    _, weights = route(logits, spec)
    torch.testing.assert_close(weights, torch.tensor([[1.25, 1.25]]))


def test_low_precision_logits_give_float32_weights() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0]]).log().to(torch.bfloat16)
    ids, weights = route(logits, RouterSpec("softmax_topk", top_k=2, normalize=False))
    assert weights.dtype == torch.float32 and ids.tolist() == [[3, 2]]
    torch.testing.assert_close(weights, logits.float().softmax(-1)[:, [3, 2]])


# --- Validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [
    ("top_k", 0), ("top_k", -2), ("scaling_factor", 0.0), ("scaling_factor", -1.0),
    ("num_groups", 0), ("topk_groups", 0),
])
def test_router_spec_rejects_non_positive_values(field: str, value: float) -> None:
    fields = {"top_k": 2, "normalize": True, "scaling_factor": 1.0, "num_groups": 1,
              "topk_groups": 1, field: value}
    with pytest.raises(ValueError, match=rf"RouterSpec\.{field} must be positive, got {value}"):
        RouterSpec("softmax_topk", **fields)  # type: ignore[arg-type]


def test_router_spec_rejects_more_kept_groups_than_groups() -> None:
    with pytest.raises(ValueError, match=r"topk_groups \(3\) exceeds num_groups \(2\)"):
        RouterSpec("noaux_tc", top_k=2, normalize=True, num_groups=2, topk_groups=3)


def test_moe_spec_rejects_top_k_above_the_expert_count() -> None:
    router = RouterSpec("softmax_topk", top_k=9, normalize=True)
    with pytest.raises(ValueError, match=r"top_k \(9\) exceeds num_experts \(8\)"):
        MoESpec(num_experts=8, expert_intermediate_size=16, router=router)
    MoESpec(num_experts=9, expert_intermediate_size=16, router=router)  # the limit itself is fine


def test_moe_spec_rejects_groups_that_do_not_divide_the_experts() -> None:
    router = RouterSpec("group_limited_greedy", top_k=2, normalize=False, num_groups=3)
    with pytest.raises(ValueError, match=r"num_groups \(3\) must divide num_experts \(8\)"):
        MoESpec(num_experts=8, expert_intermediate_size=16, router=router)
