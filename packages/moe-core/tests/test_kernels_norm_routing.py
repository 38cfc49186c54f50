"""`kernels.rms_norm`, `kernels.add_rms_norm` and `kernels.softmax_topk` against their torch
references. Compiled on CUDA where present, else under Triton's CPU interpreter.

Rounding is checked bit for bit in float16 (the interpreter rounds float16 to nearest like the
GPU; its bfloat16 casts truncate, so bfloat16 is checked within a tolerance off the GPU).

Dimension key: N rows, D hidden, T tokens, E routed experts, K experts per token.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from moe_core.kernels import add_rms_norm, rms_norm, rms_norm_supported, softmax_topk
from moe_core.kernels import norm as norm_module
from moe_core.kernels import routing as routing_module
from moe_core.kernels.reference import (
    add_rms_norm_reference,
    rms_norm_reference,
    softmax_topk_reference,
)


@pytest.fixture
def device(kernel_device: Callable[..., torch.device]) -> torch.device:
    """Where the kernels run (see conftest); a fallback to a torch reference fails the test."""
    where = kernel_device(norm_module, ("rms_norm_reference", "add_rms_norm_reference"))
    kernel_device(routing_module, ("softmax_topk_reference",))
    return where


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference, in float64 on the CPU."""
    assert actual.shape == expected.shape
    return (actual.cpu().double() - expected.cpu().double()).abs().max().item()


def ulps_apart(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Elementwise distance in units in the last place of `expected`'s dtype (float16 here)."""
    spacing = torch.finfo(expected.dtype).eps * expected.double().abs().clamp_min(2.0**-14)
    return (actual.double() - expected.double()).abs() / spacing


# --- RMSNorm ----------------------------------------------------------------------------------


def test_float32_rows_match_the_reference(device: torch.device) -> None:
    torch.manual_seed(0)
    x = torch.randn(5, 300, device=device) * 3  # D not a power of two
    weight = torch.randn(300, device=device)
    expected = rms_norm_reference(x.cpu(), weight.cpu(), 1e-6)
    assert max_error(rms_norm(x, weight, 1e-6), expected) <= 1e-5 * expected.abs().max()


def test_float16_rounds_like_rmsnorm_forward(device: torch.device) -> None:
    """Cast to the row's dtype before the weight multiply, then one rounding of the product."""
    torch.manual_seed(1)
    x = torch.randn(4, 256).to(device, torch.float16)
    weight = (torch.rand(256) + 0.5).to(device, torch.float16)
    out = rms_norm(x, weight, 1e-5)
    expected = rms_norm_reference(x.cpu(), weight.cpu(), 1e-5)
    assert out.dtype == torch.float16
    # The float32 statistics may differ in the last bit (summation order): at most one ulp.
    distance = ulps_apart(out.cpu(), expected)
    assert distance.max() <= 1 and (distance == 0).float().mean() >= 0.99


def test_weight_dtype_promotes_the_output(device: torch.device) -> None:
    torch.manual_seed(2)
    x = torch.randn(3, 64).to(device, torch.bfloat16)
    weight = torch.randn(64, device=device)  # float32 weight: float32 output, as torch promotes
    out = rms_norm(x, weight, 1e-6)
    expected = rms_norm_reference(x.cpu(), weight.cpu(), 1e-6)
    assert out.dtype == expected.dtype == torch.float32
    assert max_error(out, expected) <= 1e-2 * expected.abs().max()


def test_leading_dims_and_strided_rows(device: torch.device) -> None:
    torch.manual_seed(3)
    x = torch.randn(2, 3, 100, device=device)[..., :96]  # rows 100 apart
    weight = torch.randn(96, device=device)
    out = rms_norm(x, weight, 1e-6)
    assert out.shape == (2, 3, 96)
    expected = rms_norm_reference(x.cpu(), weight.cpu(), 1e-6)
    assert max_error(out, expected) <= 1e-5 * expected.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_add_rms_norm_returns_the_sum_and_its_norm(device: torch.device,
                                                   dtype: torch.dtype) -> None:
    torch.manual_seed(4)
    x = torch.randn(3, 200).to(device, dtype)
    delta = torch.randn(3, 200).to(device, dtype)
    weight = torch.randn(200).to(device, dtype)
    summed, normed = add_rms_norm(x, delta, weight, 1e-6)
    expected_sum, expected_norm = add_rms_norm_reference(x.cpu(), delta.cpu(), weight.cpu(), 1e-6)
    assert summed.dtype == normed.dtype == dtype
    if dtype == torch.bfloat16 and device.type == "cpu":  # the interpreter truncates to bf16
        assert max_error(summed, expected_sum) <= 2**-7 * expected_sum.abs().max()
        assert max_error(normed, expected_norm) <= 2e-2 * expected_norm.abs().max()
        return
    assert torch.equal(summed.cpu(), expected_sum)  # rounded as torch's `x + delta`
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    assert max_error(normed, expected_norm) <= tolerance * expected_norm.abs().max()


def test_norm_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # a request for Triton; the checks refuse it
    x, weight = torch.randn(2, 8), torch.randn(8)
    assert not rms_norm_supported(x, weight[:4])
    assert not rms_norm_supported(x.double(), weight)
    assert not rms_norm_supported(x.t(), torch.randn(2))  # last dim strided
    delta = torch.randn(2, 8, dtype=torch.float64)  # promotes the sum: the reference decides
    summed, normed = add_rms_norm(x, delta, weight, 1e-6)
    assert summed.dtype == torch.float64
    assert torch.equal(normed, add_rms_norm_reference(x, delta, weight, 1e-6)[1])
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not rms_norm_supported(x, weight)  # CPU without the interpreter
    assert torch.equal(rms_norm(x, weight, 1e-6), rms_norm_reference(x, weight, 1e-6))


# --- softmax top-k ----------------------------------------------------------------------------


def distinct_logits(t: int, e: int, dtype: torch.dtype) -> torch.Tensor:
    """Logits without ties in any dtype: a permutation of multiples of 1/16 (exact in bf16)."""
    return torch.stack([(torch.randperm(e) - e / 2) / 16 for _ in range(t)]).to(dtype)


def assert_same_choice(ids: torch.Tensor, weights: torch.Tensor, expected_ids: torch.Tensor,
                       expected_weights: torch.Tensor) -> None:
    """Same expert set per row and weights within 1e-6 (compared in expert-id order)."""
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
    ids, weights = ids.cpu(), weights.cpu()
    order, expected_order = ids.argsort(dim=-1), expected_ids.argsort(dim=-1)
    assert torch.equal(ids.gather(1, order), expected_ids.gather(1, expected_order))
    assert max_error(weights.gather(1, order), expected_weights.gather(1, expected_order)) <= 1e-6


@pytest.mark.parametrize(("t", "e", "k", "normalize", "scaling"),
                         [(12, 128, 8, True, 1.0), (5, 60, 6, False, 2.5), (2, 256, 8, True, 16.0)])
def test_softmax_topk_matches_the_reference(device: torch.device, t: int, e: int, k: int,
                                            normalize: bool, scaling: float) -> None:
    torch.manual_seed(e)
    logits = torch.randn(t, e) * 2
    ids, weights = softmax_topk(logits.to(device), k, normalize, scaling)
    assert_same_choice(ids, weights, *softmax_topk_reference(logits, k, normalize, scaling))
    assert torch.all(weights[:, :-1] >= weights[:, 1:])  # best first, as torch.topk


def test_softmax_topk_reads_half_precision_logits(device: torch.device) -> None:
    torch.manual_seed(7)
    logits = distinct_logits(4, 64, torch.bfloat16)
    ids, weights = softmax_topk(logits.to(device), 4, True, 1.0)
    assert_same_choice(ids, weights, *softmax_topk_reference(logits, 4, True, 1.0))


def test_softmax_topk_breaks_ties_towards_the_lowest_id(device: torch.device) -> None:
    logits = torch.zeros(2, 10, device=device)
    logits[1, 7] = 1.0
    ids, weights = softmax_topk(logits, 3, False, 1.0)
    assert ids.cpu().tolist() == [[0, 1, 2], [7, 0, 1]]
    assert max_error(weights[0], torch.full((3,), 0.1)) <= 1e-7


def test_softmax_topk_falls_back_off_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    logits = torch.randn(3, 16)
    ids, weights = softmax_topk(logits, 2, True, 1.0)
    expected_ids, expected_weights = softmax_topk_reference(logits, 2, True, 1.0)
    assert torch.equal(ids, expected_ids) and torch.equal(weights, expected_weights)
