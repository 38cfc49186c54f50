"""Triton kernels of grouped-query decode attention, flash-decoding style (Dao et al. 2023,
"Flash-Decoding for long-context inference"): partial softmaxes over key splits, then a combine.
Imported only on first use (see `backend`).

Dimension key: B batch, H query heads, G key/value heads, R = H/G query heads per group,
S keys, E head channels, NS key splits.

One program holds all R query heads of one key/value group (padded to 16 rows, the smallest
`tl.dot` tile) and streams a range of keys once: scores are `[R, E] @ [E, BLOCK_S]` and the values
`[R, BLOCK_S] @ [BLOCK_S, E]`, both on tensor cores with float32 accumulation. The softmax is
online (Milakov & Gimelshein 2018): a running max, sum and rescaled output per head.
"""

from __future__ import annotations

import functools

import triton.language as tl

from moe_core.kernels.backend import Kernel, Mode, jit

__all__ = ["kernels"]


def _split_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, index_ptr, lse_ptr, part_ptr, out_ptr,
                  num_groups, group_size, num_keys, head_dim, split_len, num_splits, scale,
                  stride_qb, stride_qh, stride_kb, stride_ks, stride_kg,
                  stride_vb, stride_vs, stride_vg, stride_mb, stride_ms, stride_ib,
                  BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr,
                  DOT_F32: tl.constexpr, PRECISION: tl.constexpr, DIRECT: tl.constexpr,
                  PAGED: tl.constexpr):
    """Attention of the R heads of group g over keys `[split*split_len, +split_len)`.

    PAGED: key s of row b is slot `index[b, s]` of the key/value tensors (a paged pool, batch
    stride 0), else slot s.

    Grid `(B*G, NS)`. DIRECT (NS = 1): writes the normalised output `[B, H, E]`; otherwise the
    normalised partial output `part [B, H, NS, E]` and its log-sum-exp `lse [B, H, NS]`, float32.
    DOT_F32 runs the products in float32 (float32 inputs, and bf16 under the interpreter, whose
    bf16 `tl.dot` is wrong); otherwise in the inputs' dtype with the probabilities cast to it.
    """
    bg = tl.program_id(0)
    split = tl.program_id(1)
    b = bg // num_groups
    g = bg % num_groups
    r = tl.arange(0, BLOCK_R)
    e = tl.arange(0, BLOCK_E)
    r_ok = r < group_size
    e_ok = e < head_dim
    h = g * group_size + r  # [BLOCK_R] query heads of this group
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + h[:, None] * stride_qh + e[None, :],
                mask=r_ok[:, None] & e_ok[None, :], other=0.0)  # [BLOCK_R, BLOCK_E]
    if DOT_F32:
        q = q.to(tl.float32)
    k_base = k_ptr + b.to(tl.int64) * stride_kb + g * stride_kg
    v_base = v_ptr + b.to(tl.int64) * stride_vb + g * stride_vg
    m_base = mask_ptr + b.to(tl.int64) * stride_mb
    start = split * split_len
    end = tl.minimum(start + split_len, num_keys)
    m_i = tl.zeros([BLOCK_R], dtype=tl.float32) + float("-inf")
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_E], dtype=tl.float32)
    for s0 in range(start, end, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)  # [BLOCK_S]
        s_ok = s < end
        s64 = s.to(tl.int64)
        if PAGED:  # where each key lies in the pool (the mask still goes by s)
            at = tl.load(index_ptr + b.to(tl.int64) * stride_ib + s64, mask=s_ok,
                         other=0).to(tl.int64)
        else:
            at = s64
        kv_ok = s_ok[None, :] & e_ok[:, None]  # [BLOCK_E, BLOCK_S]
        kt = tl.load(k_base + at[None, :] * stride_ks + e[:, None], mask=kv_ok,
                     other=0.0)  # [BLOCK_E, BLOCK_S]: keys loaded transposed
        v = tl.load(v_base + at[:, None] * stride_vs + e[None, :],
                    mask=s_ok[:, None] & e_ok[None, :], other=0.0)  # [BLOCK_S, BLOCK_E]
        if DOT_F32:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        bias = tl.load(m_base + s64 * stride_ms, mask=s_ok, other=0.0).to(tl.float32)
        # Mask values are clamped to >= -3e38: a split whose keys are all masked keeps a finite,
        # hugely negative log-sum-exp and weighs exactly 0 in the combine, even for a -inf mask.
        # Keys past the split are -inf: they get probability 0 in any case.
        bias = tl.where(s_ok, tl.maximum(bias, -3.0e38), float("-inf"))  # [BLOCK_S]
        scores = tl.dot(q, kt, input_precision=PRECISION) * scale + bias[None, :]
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))  # finite: every step has a key
        alpha = tl.exp(m_i - m_new)  # 0 on the first step
        p = tl.exp(scores - m_new[:, None])  # [BLOCK_R, BLOCK_S]
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    o = acc / l_i[:, None]  # [BLOCK_R, BLOCK_E]
    ok = r_ok[:, None] & e_ok[None, :]
    num_heads = num_groups * group_size
    if DIRECT:
        rows = (b * num_heads + h).to(tl.int64) * head_dim  # out is contiguous [B, H, E]
        tl.store(out_ptr + rows[:, None] + e[None, :], o.to(out_ptr.dtype.element_ty), mask=ok)
    else:
        slot = (b * num_heads + h).to(tl.int64) * num_splits + split  # [BLOCK_R]
        tl.store(part_ptr + slot[:, None] * head_dim + e[None, :], o, mask=ok)
        tl.store(lse_ptr + slot, m_i + tl.log(l_i), mask=r_ok)


def _combine_kernel(lse_ptr, part_ptr, out_ptr, head_dim, num_splits,
                    BLOCK_NS: tl.constexpr, BLOCK_E: tl.constexpr):
    """`out[b, h] = sum_j exp(lse_j - max) * part_j / sum_j exp(lse_j - max)`; grid `(B*H,)`."""
    bh = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, BLOCK_NS)
    e = tl.arange(0, BLOCK_E)
    j_ok = j < num_splits
    lse = tl.load(lse_ptr + bh * num_splits + j, mask=j_ok, other=float("-inf"))  # [BLOCK_NS]
    w = tl.exp(lse - tl.max(lse, axis=0))  # 0 for padding and fully masked splits
    ok = j_ok[:, None] & (e < head_dim)[None, :]
    part = tl.load(part_ptr + (bh * num_splits + j)[:, None] * head_dim + e[None, :], mask=ok,
                   other=0.0)  # [BLOCK_NS, BLOCK_E]
    out = tl.sum(part * w[:, None], axis=0) / tl.sum(w, axis=0)  # [BLOCK_E]
    tl.store(out_ptr + bh * head_dim + e, out.to(out_ptr.dtype.element_ty), mask=e < head_dim)


@functools.cache
def kernels(mode: Mode) -> tuple[Kernel, Kernel]:
    """`(split, combine)` decorated for `mode`."""
    split, combine = jit((_split_kernel, _combine_kernel), mode)
    return split, combine
