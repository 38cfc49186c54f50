"""Triton kernel of RMSNorm, optionally fused with the residual add before it. Imported only on
first use (see `backend`).

Dimension key: N rows, D hidden.
"""

from __future__ import annotations

import functools

import triton.language as tl

from moe_core.kernels.backend import Kernel, Mode, jit

__all__ = ["kernels"]


def _rms_norm_kernel(x_ptr, delta_ptr, weight_ptr, sum_ptr, out_ptr, hidden, eps,
                     stride_x, stride_delta, stride_sum, stride_out,
                     BLOCK_D: tl.constexpr, ADD: tl.constexpr):
    """One row per program (grid `(N,)`), the whole row in registers.

    ADD: `x + delta` first, rounded to x's dtype (a float32 sum then one rounding, as torch does
    for half types), stored to `sum_ptr`, and normalised. Then `RMSNorm.forward`'s order: float32
    statistics, the normalised row rounded to x's dtype, then the weight product rounded to the
    output's dtype (the float32 product of two half values is exact, so this is torch's one
    rounding).
    """
    row = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    ok = d < hidden
    x = tl.load(x_ptr + row * stride_x + d, mask=ok, other=0.0)  # [BLOCK_D]
    if ADD:
        delta = tl.load(delta_ptr + row * stride_delta + d, mask=ok, other=0.0)
        x = (x.to(tl.float32) + delta.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_sum + d, x, mask=ok)
    x32 = x.to(tl.float32)
    mean_square = tl.sum(x32 * x32, axis=0) / hidden
    inv_rms = 1.0 / tl.sqrt(mean_square + eps)
    y = (x32 * inv_rms).to(x_ptr.dtype.element_ty)
    w = tl.load(weight_ptr + d, mask=ok, other=0.0)
    out = w.to(tl.float32) * y.to(tl.float32)
    tl.store(out_ptr + row * stride_out + d, out.to(out_ptr.dtype.element_ty), mask=ok)


@functools.cache
def kernels(mode: Mode) -> tuple[Kernel]:
    """`(rms_norm,)` decorated for `mode`."""
    (rms_norm,) = jit((_rms_norm_kernel,), mode)
    return (rms_norm,)
