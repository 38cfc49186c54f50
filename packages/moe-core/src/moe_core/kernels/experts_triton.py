"""Triton kernels of the routed experts: gate/up/SiLU per assignment, then down plus the weighted
sum over each token's experts. Imported only on first use (see `backend`).

Dimension key: T tokens, K experts per token, A = T*K assignments (row `t*K + k`), D hidden,
I expert width, R = BLOCK_K * BLOCK_OUT rows of a down tile.

Both kernels are GEMVs (one token against one matrix), bound by reading the weights: each program
streams a `[rows, columns]` tile of one expert's matrix straight out of the weight stack (never a
gathered copy), multiplies it by a broadcast vector and accumulates in float32 registers; the sum
over columns happens once, after the loop. Matrix offsets are int64: a slot pool of a large
model spans more than 2**31 elements.
"""

from __future__ import annotations

import functools

import triton.language as tl

from moe_core.kernels.backend import Kernel, Mode, jit

__all__ = ["kernels"]


def _gate_up_kernel(x_ptr, index_ptr, gate_ptr, up_ptr, h_ptr,
                    top_k, hidden, width,
                    stride_xt, stride_it, stride_ik,
                    stride_gw, stride_gi, stride_uw, stride_ui,
                    BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr):
    """`h[a, i] = silu(gate[j, i] . x_t) * (up[j, i] . x_t)` for assignment a = t*K + k, j its row.

    Grid `(A, cdiv(I, BLOCK_I))`: axis 0 (the fastest-issued) is the assignment, so tokens that
    share an expert read the same rows at about the same time and hit in L2.
    """
    a = tl.program_id(0)
    t = a // top_k
    k = a % top_k
    row = tl.load(index_ptr + t * stride_it + k * stride_ik).to(tl.int64)
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)  # [BLOCK_I]
    i_ok = i < width
    gate_rows = gate_ptr + row * stride_gw + i.to(tl.int64)[:, None] * stride_gi  # [BLOCK_I, 1]
    up_rows = up_ptr + row * stride_uw + i.to(tl.int64)[:, None] * stride_ui
    cols = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    acc_gate = tl.zeros([BLOCK_I, BLOCK_D], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_I, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, hidden, BLOCK_D):
        d = d0 + cols
        d_ok = d < hidden
        x = tl.load(x_ptr + t * stride_xt + d, mask=d_ok, other=0.0)  # [BLOCK_D]
        # gathered_experts casts the hidden state to the weights' dtype first; so do we.
        x = x.to(gate_ptr.dtype.element_ty).to(tl.float32)
        ok = i_ok[:, None] & d_ok[None, :]
        g = tl.load(gate_rows + d[None, :], mask=ok, other=0.0)  # [BLOCK_I, BLOCK_D]
        u = tl.load(up_rows + d[None, :], mask=ok, other=0.0)
        acc_gate += g.to(tl.float32) * x[None, :]
        acc_up += u.to(tl.float32) * x[None, :]
    g_out = tl.sum(acc_gate, axis=1)  # [BLOCK_I]
    u_out = tl.sum(acc_up, axis=1)
    h = g_out / (1.0 + tl.exp(-g_out)) * u_out  # silu(g) * u
    tl.store(h_ptr + a * width + i, h, mask=i_ok)


def _down_kernel(h_ptr, index_ptr, weights_ptr, down_ptr, out_ptr,
                 top_k, hidden, width,
                 stride_it, stride_ik, stride_wt, stride_wk,
                 stride_dw, stride_dd, stride_ot,
                 BLOCK_K: tl.constexpr, BLOCK_OUT: tl.constexpr,
                 BLOCK_I: tl.constexpr):
    """`out[t, d] = sum_k weights[t, k] * (down[j_k, d] . h[t*K + k])` for a block of outputs d.

    Grid `(T, cdiv(D, BLOCK_OUT))`. A tile row r is (expert `r // BLOCK_OUT`, output
    `r % BLOCK_OUT`), so all K experts of the token stream in together (memory parallelism at
    batch 1); the sum over experts is a fixed one-hot reduction at the end: no atomics,
    deterministic.
    """
    t = tl.program_id(0)
    r = tl.arange(0, BLOCK_K * BLOCK_OUT)  # [R]
    k = r // BLOCK_OUT
    local = r % BLOCK_OUT
    d = tl.program_id(1) * BLOCK_OUT + local  # [R]
    k_ok = k < top_k
    r_ok = k_ok & (d < hidden)
    rows = tl.load(index_ptr + t * stride_it + k * stride_ik, mask=k_ok, other=0).to(tl.int64)
    w = tl.load(weights_ptr + t * stride_wt + k * stride_wk, mask=k_ok, other=0.0)  # [R]
    down_rows = down_ptr + rows * stride_dw + d.to(tl.int64) * stride_dd  # [R]
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
