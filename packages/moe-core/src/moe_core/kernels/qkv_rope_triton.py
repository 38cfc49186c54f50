"""Triton kernel of the decode step's attention prologue: per-head qk-norm, rotary embedding and
the key/value cache write, one program per head. Imported only on first use (see `backend`).

Dimension key: B batch, H query heads, G key/value heads, E head channels (h = E/2), W = (H+2G)*E.
"""

from __future__ import annotations

import functools

import triton.language as tl

from moe_core.kernels.backend import Kernel, Mode, jit

__all__ = ["kernels"]


def _qkv_rope_kernel(qkv_ptr, qn_ptr, kn_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, slot_ptr,
                     num_heads, num_kv, half, eps,
                     stride_xb, stride_cb, stride_sb, stride_kb, stride_ks, stride_kg,
                     stride_vb, stride_vs, stride_vg,
                     BLOCK_H: tl.constexpr, NORM: tl.constexpr):
    """Grid `(B, H + 2G)`. Program j < H: query head j, normalised and rotated into `q [B, H, E]`;
    H <= j < H+G: key head j-H, normalised and rotated into the key cache at row b's slot
    (`slot[b * stride_sb]`: one slot for all rows with stride 0, or a slot per row of a shared
    pool, whose batch stride is then 0); the rest: value head j-H-G copied into the value cache
    at that slot.

    Rounding follows the separate kernels it replaces: the norm's result rounded to the
    activation dtype, times the weight rounded again (as `RMSNorm`), then the rotation in float32
    rounded once (as `kernels.rotary`).
    """
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    e = 2 * half
    offs = tl.arange(0, BLOCK_H)
    ok = offs < half
    dtype = q_ptr.dtype.element_ty
    slot = tl.load(slot_ptr + b * stride_sb)
    row = qkv_ptr + b * stride_xb + j * e
    x1 = tl.load(row + offs, mask=ok, other=0.0)
    x2 = tl.load(row + half + offs, mask=ok, other=0.0)
    if j >= num_heads + num_kv:  # a value head: stored as it is
        g = j - num_heads - num_kv
        dst = v_ptr + b * stride_vb + slot * stride_vs + g * stride_vg
        tl.store(dst + offs, x1, mask=ok)
        tl.store(dst + half + offs, x2, mask=ok)
    else:
        a = x1.to(tl.float32)
        c = x2.to(tl.float32)
        if NORM:
            inv_rms = 1.0 / tl.sqrt((tl.sum(a * a, axis=0) + tl.sum(c * c, axis=0)) / e + eps)
            if j < num_heads:
                w1 = tl.load(qn_ptr + offs, mask=ok, other=0.0).to(tl.float32)
                w2 = tl.load(qn_ptr + half + offs, mask=ok, other=0.0).to(tl.float32)
            else:
                w1 = tl.load(kn_ptr + offs, mask=ok, other=0.0).to(tl.float32)
                w2 = tl.load(kn_ptr + half + offs, mask=ok, other=0.0).to(tl.float32)
            a = (w1 * (a * inv_rms).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
            c = (w2 * (c * inv_rms).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        cos_row = cos_ptr + b * stride_cb
        sin_row = sin_ptr + b * stride_cb
        c1 = tl.load(cos_row + offs, mask=ok, other=0.0).to(tl.float32)
        c2 = tl.load(cos_row + half + offs, mask=ok, other=0.0).to(tl.float32)
        s1 = tl.load(sin_row + offs, mask=ok, other=0.0).to(tl.float32)
        s2 = tl.load(sin_row + half + offs, mask=ok, other=0.0).to(tl.float32)
        r1 = (a * c1 - c * s1).to(dtype)
        r2 = (c * c2 + a * s2).to(dtype)
        if j < num_heads:
            dst = q_ptr + (b * num_heads + j) * e
        else:
            dst = k_ptr + b * stride_kb + slot * stride_ks + (j - num_heads) * stride_kg
        tl.store(dst + offs, r1, mask=ok)
        tl.store(dst + half + offs, r2, mask=ok)


@functools.cache
def kernels(mode: Mode) -> tuple[Kernel]:
    """`(qkv_rope,)` decorated for `mode`."""
    (qkv_rope,) = jit((_qkv_rope_kernel,), mode)
    return (qkv_rope,)
