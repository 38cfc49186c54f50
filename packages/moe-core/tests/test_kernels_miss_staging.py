"""`kernels.miss_staging`: the plan of which missed experts a decode call stages, each distinct
expert once, in expert order while rows last; the kernel (compiled on CUDA, else Triton's
interpreter) against the torch reference, and the reference against the rule itself.

Dimension key: J assignments, E experts of the layer, R staging rows.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from moe_core.kernels.miss_staging import (
    STAGED_BASE,
    miss_staging_plan,
    miss_staging_reference,
)


@pytest.fixture
def device(kernel_device: Callable[..., torch.device]) -> torch.device:
    """Where the kernel runs (see conftest); a fallback to the reference fails the test."""
    from moe_core.kernels import miss_staging as module

    return kernel_device(module, ("miss_staging_reference",))


@st.composite
def calls(draw: st.DrawFn) -> tuple[list[int], list[int], int]:
    """`(ids, lut, rows)`: a call's assignments over a table of slots, host (-1) and CPU-lane
    (-2) entries, and a number of staging rows."""
    e = draw(st.integers(1, 40))
    lut = draw(st.lists(st.sampled_from([-2, -1, -1, 0, 1, 2, 7]), min_size=e, max_size=e))
    ids = draw(st.lists(st.integers(0, e - 1), min_size=1, max_size=48))
    return ids, lut, draw(st.integers(1, 12))


def check_rule(ids: list[int], lut: list[int], rows: int, call_lut: torch.Tensor,
               row_experts: torch.Tensor) -> None:
    """The plan is the rule: the used experts left on the host, in expert order, get rows
    0, 1, ... while they last; nothing else changes; empty rows are -1."""
    missed = sorted({e for e in ids if lut[e] == -1})
    staged = missed[:rows]
    want_lut = list(lut)
    for r, e in enumerate(staged):
        want_lut[e] = STAGED_BASE - r
    assert call_lut.tolist() == want_lut
    assert row_experts.tolist() == staged + [-1] * (rows - len(staged))


@settings(max_examples=200, deadline=None)
@given(calls())
def test_the_reference_follows_the_rule(call: tuple[list[int], list[int], int]) -> None:
    ids, lut, rows = call
    check_rule(ids, lut, rows, *miss_staging_reference(torch.tensor(ids), torch.tensor(lut),
                                                        rows))


@pytest.mark.parametrize("seed", range(6))
def test_the_kernel_follows_the_rule(device: torch.device, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    e = [8, 128, 5, 160, 64, 256][seed]
    j = [8, 128, 3, 16, 1, 128][seed]
    rows = [28, 56, 1, 4, 8, 28][seed]
    lut = torch.tensor([-2, -1, -1, -1, 0, 3, 9])[torch.randint(0, 7, (e,), generator=gen)]
    ids = torch.randint(0, e, (j,), generator=gen)
    call_lut, row_experts = miss_staging_plan(ids.to(device), lut.to(device), rows)
    check_rule(ids.tolist(), lut.tolist(), rows, call_lut.cpu(), row_experts.cpu())


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one staging row"):
        miss_staging_plan(torch.tensor([0]), torch.tensor([-1]), 0)
    with pytest.raises(ValueError, match="int64"):
        miss_staging_plan(torch.tensor([0]), torch.tensor([-1], dtype=torch.int32), 1)
