"""`kernels.rotary` against its torch reference and `apply_rotary`. Compiled on CUDA where
present, else under Triton's CPU interpreter.

Dimension key: B batch, H heads, T tokens, R rotary channels.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import pytest
import torch
from moe_core.kernels.rotary import rotary, rotary_reference, rotary_supported
from moe_core.layers.rotary import apply_rotary

rotary_module = importlib.import_module("moe_core.kernels.rotary")  # the package exports the
# function under the module's name


@pytest.fixture
def device(kernel_device: Callable[..., torch.device]) -> torch.device:
    """Where the kernels run (see conftest); a fallback to a torch reference fails the test."""
    return kernel_device(rotary_module, ("rotary_reference",))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rotary_matches_the_reference_on_strided_heads(device: torch.device,
                                                       dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    b, t, h, r = 2, 5, 6, 16
    qkv = torch.randn(b, t, 2 * h, r, dtype=dtype, device=device)  # a projection's output
    x = qkv[:, :, ::2].transpose(1, 2)  # [B, H, T, R], every other head: strided
    cos = torch.randn(b, t, r, dtype=dtype, device=device)
    sin = torch.randn(b, t, r, dtype=dtype, device=device)
    assert rotary_supported(x, cos)
    got = rotary(x, cos, sin)
    want = rotary_reference(x.double(), cos.double(), sin.double())
    assert got.is_contiguous() and got.shape == (b, h, t, r) and got.dtype == dtype
    tolerance = 1e-6 if dtype == torch.float32 else 2e-3
    assert ((got.double() - want).abs() <= tolerance * want.abs().clamp_min(1.0)).all()


def test_apply_rotary_uses_the_kernel_only_for_cuda_halves() -> None:
    x, cos, sin = torch.randn(1, 2, 3, 8), torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    assert torch.equal(apply_rotary(x, cos, sin), rotary_reference(x, cos, sin))  # CPU: torch
    assert not rotary_supported(x, cos.half())  # mixed dtypes take the torch path
