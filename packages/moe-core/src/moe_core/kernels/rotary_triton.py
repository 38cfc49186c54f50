"""Triton kernel of rotary embeddings in the halves layout. Imported only on first use (see
`backend`).

Dimension key: B batch, H heads, T tokens, R rotary channels (h = R/2).
"""

from __future__ import annotations

import functools

import triton.language as tl

from moe_core.kernels.backend import Kernel, Mode, jit

__all__ = ["kernels"]


def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, heads, tokens, half,
                   stride_xb, stride_xh, stride_xt, stride_cb, stride_ct,
                   BLOCK_H: tl.constexpr):
    """One `(b, h, t)` row per program (grid `(B*H*T,)`): `out = x*cos + rotate_half(x)*sin`,
    in float32, rounded once to the output's dtype. `out` is contiguous `[B, H, T, R]`."""
    row = tl.program_id(0).to(tl.int64)
    t = row % tokens
    h = (row // tokens) % heads
    b = row // (tokens * heads)
    j = tl.arange(0, BLOCK_H)
    ok = j < half
    x_row = x_ptr + b * stride_xb + h * stride_xh + t * stride_xt
    c_row = b * stride_cb + t * stride_ct
    x1 = tl.load(x_row + j, mask=ok, other=0.0).to(tl.float32)  # [h] first half
    x2 = tl.load(x_row + half + j, mask=ok, other=0.0).to(tl.float32)  # [h] second half
    c1 = tl.load(cos_ptr + c_row + j, mask=ok, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + c_row + half + j, mask=ok, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + c_row + j, mask=ok, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + c_row + half + j, mask=ok, other=0.0).to(tl.float32)
    out_row = out_ptr + row * 2 * half
    dtype = out_ptr.dtype.element_ty
    tl.store(out_row + j, (x1 * c1 - x2 * s1).to(dtype), mask=ok)
    tl.store(out_row + half + j, (x2 * c2 + x1 * s2).to(dtype), mask=ok)


@functools.cache
def kernels(mode: Mode) -> tuple[Kernel]:
    """`(rotary,)` decorated for `mode`."""
    (rotary,) = jit((_rotary_kernel,), mode)
    return (rotary,)
