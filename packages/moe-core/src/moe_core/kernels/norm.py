"""RMSNorm in one kernel, and a residual add fused with the norm after it.

Dimension key: N rows, D hidden.

Why: at batch-1 decode every norm is a chain of small kernels (cast, square, mean, rsqrt, scale,
cast, weight multiply) bound by launches; a decoder layer has two norms, each after a residual
add. One kernel per norm, the add included, reads the row once and writes it once (twice with
the add: the sum is the next residual).
"""

from __future__ import annotations

import torch

from moe_core.kernels.backend import (
    Mode,
    device_guard,
    next_power_of_2,
    triton_mode,
)
from moe_core.kernels.reference import add_rms_norm_reference, rms_norm_reference

__all__ = ["MAX_NORM_DIM", "add_rms_norm", "rms_norm", "rms_norm_supported"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_NORM_DIM = 16384
"""Widest row normalised by the kernel: a program holds the row in registers (32 float32 values
per thread at 16 warps)."""


def rms_norm_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `rms_norm` runs its Triton kernel for x `[..., D]` and weight `[D]`."""
    return (triton_mode(x.device) is not None
            and x.dim() >= 1 and x.numel() > 0 and weight.dim() == 1
            and x.dtype in _DTYPES and weight.dtype in _DTYPES
            and weight.device == x.device
            and 0 < x.shape[-1] == weight.shape[0] <= MAX_NORM_DIM
            and x.stride(-1) == 1 and weight.stride(0) == 1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`weight * (x / rms(x))` over the last dim, rounded exactly as `RMSNorm.forward` rounds.

    Statistics in float32, the normalised value cast to x's dtype, then multiplied by `weight`
    with torch's promotion (a bf16 weight on a bf16 row rounds the product to bf16).

    Args:
        x: `[..., D]` (e.g. `[N, D]`), float16, bfloat16 or float32; last dim contiguous.
        weight: `[D]`.
        eps: Added to the mean square.

    Returns:
        x's shape, in `torch.promote_types(weight.dtype, x.dtype)`.
    """
    mode = triton_mode(x.device)
    if mode is None or not rms_norm_supported(x, weight):
        return rms_norm_reference(x, weight, eps)
    return _launch(x, None, weight, eps, mode)[1]


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`(summed, rms_norm(summed, weight, eps))` with `summed = x + delta`, in one kernel.

    `summed` rounds to x's dtype exactly as torch's `x + delta` does; the kernel runs only when
    delta has x's dtype and shape (else torch's promotion would change `summed`'s dtype, and the
    reference runs).

    Args:
        x: `[..., D]` residual stream.
        delta: Like x: the sublayer output added to it.
        weight: `[D]`.
        eps: Added to the mean square.

    Returns:
        `(summed, normed)`: summed like x; normed as `rms_norm` returns it.
    """
    mode = triton_mode(x.device)
    if (mode is None or not rms_norm_supported(x, weight) or delta.shape != x.shape
            or delta.dtype != x.dtype or delta.device != x.device or delta.stride(-1) != 1):
        return add_rms_norm_reference(x, delta, weight, eps)
    summed, normed = _launch(x, delta, weight, eps, mode)
    assert summed is not None
    return summed, normed


def _launch(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
            mode: Mode) -> tuple[torch.Tensor | None, torch.Tensor]:
    from moe_core.kernels.norm_triton import kernels

    (kernel,) = kernels(mode)
    d = x.shape[-1]
    rows = x.reshape(-1, d)  # [N, D]; a view whenever the leading dims allow it
    n = rows.shape[0]
    out = torch.empty(n, d, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    summed = None if delta is None else torch.empty(n, d, dtype=x.dtype, device=x.device)
    deltas = rows if delta is None else delta.reshape(-1, d)  # [N, D]
    sums = out if summed is None else summed  # unused without ADD
    block_d = next_power_of_2(d)
    with device_guard(x.device):
        kernel[(n,)](rows, deltas, weight, sums, out, d, float(eps),
                     rows.stride(0), deltas.stride(0), sums.stride(0), out.stride(0),
                     BLOCK_D=block_d, ADD=delta is not None,
                     num_warps=4 if block_d <= 1024 else 8 if block_d <= 4096 else 16)
    normed = out.view(x.shape)
    return (None if summed is None else summed.view(x.shape)), normed
