"""Triton kernels of offloaded experts computed where they lie: each assignment's weights are read
from its GPU slot or straight from pinned host memory (over PCIe), chosen per assignment by the
device's expert-to-slot table, and multiplied in the same pass. Imported only on first use (see
`backend`).

Dimension key: T tokens, K experts per token, A = T*K assignments (row `t*K + k`), D hidden,
I expert width, N block elements, R = BLOCK_K * BLOCK_OUT rows of a down tile.

Same structure as `experts_triton` (gate/up/SiLU per assignment into a float32 `[A, I]`
intermediate, then down with each token's weighted sum over its experts), with three
differences: a block's base is `pool + slot * N` when the table gives a slot (>= 0),
`staged + r * N` when it gives a staging row (`-3 - r`, `miss_staging`: a miss copied over the
link before the call), else `host + expert * N` (the layer's host arena, addressable by the GPU:
unified virtual addressing);
an expert the table marks -2 (computed by the CPU lane) is read from nowhere and contributes
zero; and FP8 blocks (e4m3 weights, then float32 scales per output channel, `offload/fp8.py`) are
widened in registers and their products scaled once per output channel after the sum.
"""

from __future__ import annotations

import functools

import triton.language as tl

from moe_core.kernels.backend import Kernel, Mode, jit

__all__ = ["kernels"]


def _gate_up_kernel(x_ptr, ids_ptr, lut_ptr, pool_ptr, staged_ptr, host_ptr, pool_scale_ptr,
                    staged_scale_ptr, host_scale_ptr, h_ptr, top_k, hidden, width, block_numel,
                    scale_base, stride_xt, stride_it, stride_ik,
                    FP8: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr):
    """`h[a, i] = silu(gate_e[i] . x_t) * (up_e[i] . x_t)` for assignment a = t*K + k of expert e.

    Grid `(A, cdiv(I, BLOCK_I))`. `scale_base` is the float32 offset of an FP8 block's scales.
    A block not in a slot is staging row r where the table says `-3 - r`, else row e of the
    host rows.
    """
    a = tl.program_id(0)
    t = a // top_k
    k = a % top_k
    e = tl.load(ids_ptr + t * stride_it + k * stride_ik).to(tl.int64)
    slot = tl.load(lut_ptr + e).to(tl.int64)
    resident = slot >= 0
    staged = slot <= -3
    src = tl.where(resident, pool_ptr, tl.where(staged, staged_ptr, host_ptr))
    # element offset of the expert's block in its source
    block = tl.where(resident, slot, tl.where(staged, -3 - slot, e)) * block_numel
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)  # [BLOCK_I]
    i_ok = i < width
    # an expert of the CPU lane: nothing read, h = silu(0) * 0 (compared as a block: the
    # interpreter's masks must be block-shaped booleans)
    read = i_ok & ((slot + 0 * i) != -2)
    gate_rows = src + block + i.to(tl.int64)[:, None] * hidden  # [BLOCK_I, 1]
    up_rows = gate_rows + width * hidden
    cols = tl.arange(0, BLOCK_D)
    acc_gate = tl.zeros([BLOCK_I, BLOCK_D], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_I, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, hidden, BLOCK_D):
        d = d0 + cols
        d_ok = d < hidden
        x = tl.load(x_ptr + t * stride_xt + d, mask=d_ok, other=0.0)  # [BLOCK_D]
        if not FP8:  # gathered_experts casts the hidden state to the weights' dtype first
            x = x.to(pool_ptr.dtype.element_ty)
        x = x.to(tl.float32)
        ok = read[:, None] & d_ok[None, :]
        g = tl.load(gate_rows + d[None, :], mask=ok, other=0.0)  # [BLOCK_I, BLOCK_D]
        u = tl.load(up_rows + d[None, :], mask=ok, other=0.0)
        acc_gate += g.to(tl.float32) * x[None, :]
        acc_up += u.to(tl.float32) * x[None, :]
    g_out = tl.sum(acc_gate, axis=1)  # [BLOCK_I]
    u_out = tl.sum(acc_up, axis=1)
    if FP8:  # one scale per output channel: applied once, after the sum
        scales = (tl.where(resident, pool_scale_ptr,
                           tl.where(staged, staged_scale_ptr, host_scale_ptr))
                  + block // 4 + scale_base)
        g_out *= tl.load(scales + i, mask=read, other=0.0)
        u_out *= tl.load(scales + width + i, mask=read, other=0.0)
    h = g_out / (1.0 + tl.exp(-g_out)) * u_out  # silu(g) * u
    tl.store(h_ptr + a * width + i, h, mask=i_ok)


def _down_kernel(h_ptr, ids_ptr, lut_ptr, weights_ptr, pool_ptr, staged_ptr, host_ptr,
                 pool_scale_ptr, staged_scale_ptr, host_scale_ptr, out_ptr, top_k, hidden, width,
                 block_numel, scale_base, stride_it, stride_ik, stride_wt, stride_wk, stride_ot,
                 FP8: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_OUT: tl.constexpr,
                 BLOCK_I: tl.constexpr):
    """`out[t, d] = sum_k weights[t, k] * (down_e[d] . h[t*K + k])`, e the k-th expert of t.

    Grid `(T, cdiv(D, BLOCK_OUT))`. A tile row r is (expert `r // BLOCK_OUT`, output
    `r % BLOCK_OUT`): all K experts of the token stream in together, each from its own source,
    and the sum over experts is a fixed one-hot reduction at the end (no atomics).
    """
    t = tl.program_id(0)
    r = tl.arange(0, BLOCK_K * BLOCK_OUT)  # [R]
    k = r // BLOCK_OUT
    local = r % BLOCK_OUT
    d = tl.program_id(1) * BLOCK_OUT + local  # [R]
    k_ok = k < top_k
    e = tl.load(ids_ptr + t * stride_it + k * stride_ik, mask=k_ok, other=0).to(tl.int64)
    slot = tl.load(lut_ptr + e, mask=k_ok, other=-2).to(tl.int64)  # [R]
    resident = slot >= 0
    staged = slot <= -3
    r_ok = k_ok & (slot != -2) & (d < hidden)
    block = tl.where(resident, slot, tl.where(staged, -3 - slot, e)) * block_numel  # [R]
    down_rows = (tl.where(resident, pool_ptr, tl.where(staged, staged_ptr, host_ptr)) + block
                 + 2 * width * hidden + d.to(tl.int64) * width)  # [R]
    w = tl.load(weights_ptr + t * stride_wt + k * stride_wk, mask=r_ok, other=0.0)  # [R]
    h_rows = h_ptr + (t * top_k + k) * width  # [R]
    cols = tl.arange(0, BLOCK_I)
    acc = tl.zeros([BLOCK_K * BLOCK_OUT, BLOCK_I], dtype=tl.float32)
    for i0 in range(0, width, BLOCK_I):
        i = i0 + cols
        ok = r_ok[:, None] & (i < width)[None, :]
        wd = tl.load(down_rows[:, None] + i[None, :], mask=ok, other=0.0)  # [R, BLOCK_I]
        h = tl.load(h_rows[:, None] + i[None, :], mask=ok, other=0.0)
        acc += wd.to(tl.float32) * h
    y = tl.sum(acc, axis=1) * w.to(tl.float32)  # [R]
    if FP8:
        scales = (tl.where(resident, pool_scale_ptr,
                           tl.where(staged, staged_scale_ptr, host_scale_ptr))
                  + block // 4 + scale_base)
        y *= tl.load(scales + 2 * width + d, mask=r_ok, other=0.0)
    outs = tl.arange(0, BLOCK_OUT)
    pick = local[:, None] == outs[None, :]  # [R, BLOCK_OUT]
    out = tl.sum(tl.where(pick, y[:, None], 0.0), axis=0)  # [BLOCK_OUT]
    d_out = tl.program_id(1) * BLOCK_OUT + outs
    tl.store(out_ptr + t * stride_ot + d_out, out.to(out_ptr.dtype.element_ty), mask=d_out < hidden)


@functools.cache
def kernels(mode: Mode) -> tuple[Kernel, Kernel]:
    """`(gate_up, down)` decorated for `mode`."""
    gate_up, down = jit((_gate_up_kernel, _down_kernel), mode)
    return gate_up, down
