"""The host's paged decode attention kernel against a float64 reference on random page layouts."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from moe_gen.paged_attention import (
    NumbaPagedAttention,
    paged_attention_reference,
    time_paged_attention,
)

KERNEL = NumbaPagedAttention()
LOWEST = torch.finfo(torch.float32).min


@st.composite
def layouts(draw: st.DrawFn) -> dict[str, object]:
    """A batch of ragged sequences in shuffled pages of random length, GQA or MLA shaped."""
    rng = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    mla = draw(st.booleans())
    groups = 1 if mla else draw(st.sampled_from([1, 2, 4]))
    heads = groups * draw(st.sampled_from([1, 2, 3, 4]))
    widths = [draw(st.sampled_from([8, 16])), 4] if mla else [draw(st.sampled_from([4, 8, 32]))]
    page = draw(st.sampled_from([1, 4, 16]))
    past = draw(st.lists(st.integers(0, 70), min_size=1, max_size=5))
    longest = max(past)
    pages_each = -(-max(longest, 1) // page)
    order = torch.randperm(len(past) * pages_each + draw(st.integers(0, 3)), generator=rng)
    table = order[: len(past) * pages_each].view(len(past), pages_each)
    pos = torch.arange(longest)
    slots = table[:, pos // page] * page + pos % page  # [b, P]
    arena_widths = widths if mla else widths * 2
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    arenas = [torch.randn(len(order) * page, groups, w, generator=rng).to(dtype)
              for w in arena_widths]
    bias = torch.zeros(len(past), longest + 1)
    if draw(st.booleans()):  # a sliding window hides the oldest keys of long sequences
        window = draw(st.integers(1, 8))
        for i, n in enumerate(past):
            bias[i, : max(n - window + 1, 0)] = LOWEST
    return {
        "queries": [torch.randn(len(past), heads, w, generator=rng) * 2 for w in widths],
        "arenas": arenas,
        "new": [torch.randn(len(past), groups, w, generator=rng) for w in arena_widths],
        "value_index": 0 if mla else 1,
        "slots": slots.contiguous(),
        "num_past": torch.tensor(past),
        "bias": bias,
        "scale": draw(st.sampled_from([0.1, 0.35])),
    }


@settings(max_examples=40, deadline=None)
@given(layouts())
def test_kernel_equals_the_float64_reference(case: dict[str, object]) -> None:
    got = KERNEL(**case)  # type: ignore[arg-type]
    want = paged_attention_reference(**case)  # type: ignore[arg-type]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_keys_beyond_a_sequences_past_are_never_read() -> None:
    """Slots past `num_past` point at poison (NaN) rows: the result stays the reference's."""
    arenas = [torch.randn(8, 1, 4), torch.randn(8, 1, 4)]
    arenas[0][7] = float("nan")
    arenas[1][7] = float("nan")
    case = {"queries": [torch.randn(2, 2, 4)], "arenas": arenas,
            "new": [torch.randn(2, 1, 4), torch.randn(2, 1, 4)], "value_index": 1,
            "slots": torch.tensor([[0, 1, 2], [3, 7, 7]]), "num_past": torch.tensor([3, 1]),
            "bias": torch.zeros(2, 4), "scale": 0.5}
    got = KERNEL(**case)  # type: ignore[arg-type]
    assert not got.isnan().any()
    torch.testing.assert_close(got, paged_attention_reference(**case))  # type: ignore[arg-type]


def test_refuses_arenas_it_cannot_read() -> None:
    arenas = [torch.zeros(4, 1, 4, dtype=torch.float16)] * 2
    with pytest.raises(ValueError, match="bf16 or float32"):
        KERNEL([torch.zeros(1, 1, 4)], arenas, [torch.zeros(1, 1, 4)] * 2, 1,
               torch.zeros(1, 1, dtype=torch.long), torch.ones(1, dtype=torch.long),
               torch.zeros(1, 2), 1.0)


def test_timing_counts_the_kv_bytes_read() -> None:
    seconds, nbytes = time_paged_attention(KERNEL, 4, [8], 1, 2, torch.bfloat16, 3, 20,
                                           repeats=1)
    assert seconds > 0
    assert nbytes == 3 * 19 * 2 * (2 * 8) * 2  # b x past keys x (keys + values) x G x E x 2 B
    _, mla_bytes = time_paged_attention(KERNEL, 4, [8, 4], 0, 1, torch.float32, 3, 20,
                                        repeats=1)
    assert mla_bytes == 3 * 19 * (8 + 4) * 4  # the latent is read once, as key and value
