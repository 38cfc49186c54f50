"""Rotary position embeddings applied in one kernel.

Dimension key: B batch, H heads, T tokens, R rotary channels.

`apply_rotary` in torch is six kernels per call (two products, a negation, a concatenation, an
add, and the slices' copies), and a decode step makes two calls per layer: at batch 1 the step is
bound by launches, so those twelve become two. The halves layout only (DeepSeek's interleaved
pairs take the torch path).
"""

from __future__ import annotations

import torch

from moe_core.kernels.backend import Mode, device_guard, next_power_of_2, triton_mode

__all__ = ["rotary", "rotary_reference", "rotary_supported"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`x * cos + rotate_half(x) * sin` for `x` `[B, H, T, R]`, tables `[B, T, R]`."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def rotary_supported(x: torch.Tensor, cos: torch.Tensor) -> bool:
    """Whether `rotary` runs its Triton kernel for `x` `[B, H, T, R]` and tables `[B, T, R]`."""
    return (triton_mode(x.device) is not None and x.dim() == 4 and cos.dim() == 3
            and x.dtype in _DTYPES and cos.dtype == x.dtype and x.device == cos.device
            and x.numel() > 0 and x.shape[-1] % 2 == 0
            and cos.shape == (x.shape[0], x.shape[2], x.shape[3])
            and x.stride(-1) == 1 and cos.stride(-1) == 1)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` `[B, H, T, R]` (any strides, last dim contiguous) by `cos`, `sin` `[B, T, R]`
    (same strides for both); returns a contiguous `[B, H, T, R]` in x's dtype, computed in
    float32 and rounded once. The torch reference where Triton cannot run."""
    mode = triton_mode(x.device)
    if mode is None or not rotary_supported(x, cos) or sin.shape != cos.shape \
            or sin.stride() != cos.stride():
        return rotary_reference(x, cos, sin)
    return _launch(x, cos, sin, mode)


def _launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mode: Mode) -> torch.Tensor:
    from moe_core.kernels.rotary_triton import kernels

    (kernel,) = kernels(mode)
    b, h, t, r = x.shape
    out = torch.empty(b, h, t, r, dtype=x.dtype, device=x.device)
    with device_guard(x.device):
        kernel[(b * h * t,)](x, cos, sin, out, h, t, r // 2,
                             x.stride(0), x.stride(1), x.stride(2), cos.stride(0), cos.stride(1),
                             BLOCK_H=next_power_of_2(r // 2), num_warps=1)
    return out
