"""The numba source of `paged_attention.NumbaPagedAttention` (imported on first use: numba is
slow to import, and the compiled code is cached on disk beside this file).

Dimension key: b sequences, H query heads, G key/value groups, E1/E2 channels of the two key
parts (E2 = 0 for GQA), V value channels, P the longest past, N arena slots.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

__all__ = ["attend"]

_BLOCK = 32  # keys per softmax update: their scores stay in L1, their rows in L2
# No `ninf`/`nnan`: the mask's most negative value must stay ordered against real scores.
_FAST = {"nsz", "arcp", "contract", "afn", "reassoc"}


@intrinsic
def _bits_to_f32(typingctx: Any, bits: Any) -> Any:
    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


def widen(v: Any) -> Any:
    """bf16 bits (`uint16`) or a float as float32 (numba-only: see the overload below)."""
    raise NotImplementedError


@overload(widen, inline="always")
def _widen(v: Any) -> Any:
    if isinstance(v, types.Integer):  # bf16 bits: the high half of a float32
        def from_bits(v: Any) -> Any:
            return _bits_to_f32(np.uint32(v) << np.uint32(16))  # type: ignore[call-arg]
        return from_bits

    def as_is(v: Any) -> Any:
        return np.float32(v)
    return as_is


@numba.njit(parallel=True, nogil=True, fastmath=_FAST, cache=True)
def attend(q1: Any, k1: Any, nk1: Any, q2: Any, k2: Any, nk2: Any, v: Any, nv: Any,
           slots: Any, num_past: Any, bias: Any, scale: Any, out: Any) -> None:
    b_n, h_n, e1 = q1.shape
    e2 = q2.shape[2]
    g_n = v.shape[1]
    ev = v.shape[2]
    hg = h_n // g_n
    new_col = bias.shape[1] - 1
    lowest = np.float32(-3.0e38)  # the running maximum starts finite
    # One sequence per job: its keys are read in slot order, each row whole (every group),
    # so a page's rows stream sequentially through the cache.
    for b in numba.prange(b_n):
        run_max = np.full(h_n, lowest, dtype=np.float32)
        total = np.zeros(h_n, dtype=np.float32)
        acc = np.zeros((h_n, ev), dtype=np.float32)
        s = np.empty((h_n, _BLOCK), dtype=np.float32)
        n = num_past[b]
        # The past, a block of keys at a time, then the new key as a block of one.
        for start in range(0, n + 1, _BLOCK):
            stop = min(start + _BLOCK, n + 1)
            for j in range(start, stop):
                col = new_col if j == n else j
                slot = 0 if j == n else slots[b, j]
                for g in range(g_n):
                    for hh in range(hg):
                        h = g * hg + hh
                        dot = np.float32(0.0)
                        if j == n:
                            for e in range(e1):
                                dot += q1[b, h, e] * nk1[b, g, e]
                            for e in range(e2):
                                dot += q2[b, h, e] * nk2[b, g, e]
                        else:
                            for e in range(e1):
                                dot += q1[b, h, e] * widen(k1[slot, g, e])
                            for e in range(e2):
                                dot += q2[b, h, e] * widen(k2[slot, g, e])
                        s[h, j - start] = dot * scale + bias[b, col]
            for h in range(h_n):
                top = run_max[h]
                for j in range(stop - start):
                    top = max(top, s[h, j])
                fade = np.exp(run_max[h] - top)
                total[h] *= fade
                for e in range(ev):
                    acc[h, e] *= fade
                for j in range(stop - start):
                    p = np.exp(s[h, j] - top)
                    s[h, j] = p
                    total[h] += p
                run_max[h] = top
            for j in range(start, stop):
                slot = 0 if j == n else slots[b, j]
                for g in range(g_n):
                    for hh in range(hg):
                        h = g * hg + hh
                        p = s[h, j - start]
                        if j == n:
                            for e in range(ev):
                                acc[h, e] += p * nv[b, g, e]
                        else:
                            for e in range(ev):
                                acc[h, e] += p * widen(v[slot, g, e])
        for h in range(h_n):
            inv = np.float32(1.0) / total[h]
            for e in range(ev):
                out[b, h, e] = acc[h, e] * inv

