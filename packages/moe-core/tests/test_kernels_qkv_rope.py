"""`kernels.qkv_rope_store` (qk-norm, rotary and the cache write of a decode step) against its
torch reference, and the reference against the separate moe-core operations. Compiled on CUDA
where present, else under Triton's CPU interpreter.

Dimension key: B batch, H query heads, G key/value heads, E head channels, C cache slots.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import pytest
import torch
from moe_core.kernels.qkv_rope import qkv_rope_store, qkv_rope_store_reference
from moe_core.layers.norm import RMSNorm
from moe_core.layers.rotary import apply_rotary

qkv_rope_module = importlib.import_module("moe_core.kernels.qkv_rope")
B, H, G, E, C = 2, 4, 2, 16, 6


def operands(device: torch.device | str, dtype: torch.dtype, seed: int = 0
             ) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(seed)
    qkv = torch.randn(B, (H + 2 * G) * E, dtype=dtype).to(device)
    q_norm, k_norm = (torch.rand(E, dtype=dtype).to(device) + 0.5 for _ in range(2))
    cos, sin = (torch.randn(B, E, dtype=dtype).to(device) for _ in range(2))
    # Caches as views of a wider buffer (strided heads and slots), filled with noise.
    k_cache = torch.randn(B, C, G + 1, E, dtype=dtype).to(device)[:, :, 1:]
    v_cache = torch.randn(B, C, G + 1, E, dtype=dtype).to(device)[:, :, :G]
    slot = torch.tensor([3], device=device)
    return qkv, q_norm, k_norm, cos, sin, k_cache, v_cache, slot


@pytest.fixture
def device(kernel_device: Callable[..., torch.device]) -> torch.device:
    """Where the kernels run (see conftest); a fallback to a torch reference fails the test."""
    return kernel_device(qkv_rope_module, ("qkv_rope_store_reference",))


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_matches_the_reference(device: torch.device, dtype: torch.dtype,
                                      norm: bool) -> None:
    qkv, q_norm, k_norm, cos, sin, k_cache, v_cache, slot = operands(device, dtype)
    k_want, v_want = k_cache.clone(), v_cache.clone()
    norms = (q_norm, k_norm) if norm else (None, None)
    q_want = qkv_rope_store_reference(qkv, *norms, 1e-6, cos, sin, k_want, v_want, slot, H)
    q = qkv_rope_store(qkv, *norms, 1e-6, cos, sin, k_cache, v_cache, slot, H)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    for got, want in ((q, q_want), (k_cache, k_want), (v_cache, v_want)):
        assert got.shape == want.shape
        assert ((got.double() - want.double()).abs()
                <= tolerance * want.double().abs().clamp_min(1.0)).all()
    assert torch.equal(v_cache[:, 3], v_want[:, 3])  # values are copied exactly
    others = [s for s in range(C) if s != 3]
    assert torch.equal(k_cache[:, others], k_want[:, others])  # only the slot is written


def test_reference_is_the_separate_operations() -> None:
    qkv, q_norm, k_norm, cos, sin, k_cache, v_cache, slot = operands("cpu", torch.float32)
    q = qkv_rope_store_reference(qkv, q_norm, k_norm, 1e-6, cos, sin, k_cache, v_cache, slot, H)
    norm_q, norm_k = RMSNorm(E, 1e-6), RMSNorm(E, 1e-6)
    norm_q.weight.data, norm_k.weight.data = q_norm, k_norm
    qh, kh, vh = qkv.split([H * E, G * E, G * E], dim=-1)
    with torch.no_grad():
        q_want = apply_rotary(norm_q(qh.view(B, H, E))[:, :, None], cos[:, None], sin[:, None])
        k_want = apply_rotary(norm_k(kh.view(B, G, E))[:, :, None], cos[:, None], sin[:, None])
    assert torch.equal(q, q_want[:, :, 0])
    assert torch.equal(k_cache[:, 3], k_want[:, :, 0])
    assert torch.equal(v_cache[:, 3], vh.view(B, G, E))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_a_shared_pool_is_written_at_each_rows_slot(device: torch.device,
                                                    dtype: torch.dtype) -> None:
    """A paged cache's arena as one pool row `[1, N, G, E]`, row b's key and value written at
    `slot[b]`: the reference's entries, and nothing else in the pool changes."""
    qkv, q_norm, k_norm, cos, sin, _, _, _ = operands(device, dtype, seed=2)
    n = 9
    k_pool = torch.randn(1, n, G + 1, E, dtype=dtype).to(device)[:, :, 1:]
    v_pool = torch.randn(1, n, G + 1, E, dtype=dtype).to(device)[:, :, :G]
    slots = torch.tensor([7, 2], device=device)  # [B]
    k_want, v_want = k_pool.clone(), v_pool.clone()
    q_want = qkv_rope_store_reference(qkv, q_norm, k_norm, 1e-6, cos, sin, k_want, v_want,
                                      slots, H)
    q = qkv_rope_store(qkv, q_norm, k_norm, 1e-6, cos, sin, k_pool, v_pool, slots, H)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    for got, want in ((q, q_want), (k_pool, k_want), (v_pool, v_want)):
        assert ((got.double() - want.double()).abs()
                <= tolerance * want.double().abs().clamp_min(1.0)).all()
    others = [s for s in range(n) if s not in (7, 2)]
    assert torch.equal(k_pool[:, others], k_want[:, others])
    # the reference writes row b's entries where the kernel does
    vh = qkv.split([H * E, G * E, G * E], dim=-1)[2]
    assert torch.equal(v_want[0, 7], vh[0].view(G, E).to(dtype))
    assert torch.equal(v_want[0, 2], vh[1].view(G, E).to(dtype))


def test_slots_fitting_neither_layout_are_refused() -> None:
    qkv, q_norm, k_norm, cos, sin, k_cache, v_cache, _ = operands("cpu", torch.float32)
    with pytest.raises(ValueError, match="shared pool"):
        qkv_rope_store(qkv, q_norm, k_norm, 1e-6, cos, sin, k_cache, v_cache,
                       torch.tensor([1, 2]), H)
