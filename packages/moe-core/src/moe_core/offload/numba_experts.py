"""The numba-compiled layer kernels of the CPU lane (`NumbaCpuExperts`): bf16 and fp32 blocks,
and FP8 blocks read as bytes with their row scales.

Dimension key: T tokens, K experts per token, D hidden, I expert width, E experts of the layer,
n experts computed here, P their token assignments.

Each kernel is two parallel loops over weight rows (`parallel=True`, `nogil=True`): one job per
(expert, gate/up row), then one per (expert, down row), each job running its row against every
token of its expert, accumulating in float32. bf16 is widened in registers (its bits are the high
half of an fp32).

FP8 (e4m3, decision 0015) is decoded in registers too, with no table: the byte's low 7 bits go to
float32 bits 20-26 and its sign to bit 31 (`e4m3_bits`: a sign-extending load, a shift, a
mask). Read as a float32 that is exactly the
e4m3 value times 2^-120, normals and subnormals alike (e4m3's 4-bit exponent, bias 7, lands in
the low bits of float32's, bias 127; e4m3 subnormals become float32 subnormals, which x86 keeps
unless flush-to-zero is set, and numba does not set it). 0x7F/0xFF (NaN) never occur in quantised
weights. The 2^120 is split in two exact powers of two: 2^64 folded into the inputs (each token's
row, and the activations before the down projection) and 2^56 into each row's scale, so no
product of a decoded weight and an input falls in float32's subnormal range (slow on some
processors, and short of precision), and a weight costs a sign-extending load, a shift, a mask
and a fused multiply-add: the loops vectorise like the bf16 ones (one more vector operation per
eight weights, AVX2).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

import numpy as np

__all__ = ["E4M3_INPUT_FACTOR", "E4M3_ROW_FACTOR", "build_fp8_kernel", "build_kernel",
           "decode_e4m3"]

E4M3_INPUT_FACTOR = 2.0**64
"""Folded into the inputs of the FP8 kernel's products (see the module docstring)."""
E4M3_ROW_FACTOR = 2.0**56
"""Folded into each row's scale: with `E4M3_INPUT_FACTOR`, the 2^120 of the e4m3 decode."""


@cache
def _helpers() -> tuple[Any, Any, Any]:
    """`(widen_bf16, e4m3_bits, assignments)`: the njit helpers every kernel inlines."""
    import numba
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def _bits_to_f32(typingctx: Any, bits: Any) -> Any:
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            return builder.bitcast(args[0], ir.FloatType())
        return types.float32(types.uint32), codegen

    @numba.njit(inline="always")
    def widen_bf16(v: Any) -> Any:
        return _bits_to_f32(np.uint32(v) << np.uint32(16))  # type: ignore[call-arg]

    @numba.njit(inline="always")
    def e4m3_bits(v: Any) -> Any:
        # `v` is the byte as int8: sign-extended, its sign fills bits 7-31, so one shift puts
        # the low 7 bits at 20-26 and a copy of the sign at 31 (one mask clears 27-30).
        b = np.uint32(np.int32(v))
        return _bits_to_f32((b << np.uint32(20))  # type: ignore[call-arg]
                            & np.uint32(0x87F00000))

    @numba.njit(inline="always")
    def assignments(on_cpu: Any, ids: Any, weights: Any) -> Any:
        """The assignments of the chosen experts grouped by expert (serial, tiny): `(n,
        experts [n], ends [n + 1], tokens [P], scale [P])`."""
        num_tokens, top_k = ids.shape
        slot_of = np.full(on_cpu.size, -1, dtype=np.int64)
        experts = np.empty(on_cpu.size, dtype=np.int64)
        n = 0
        for e in range(on_cpu.size):
            if on_cpu[e]:
                slot_of[e] = n
                experts[n] = e
                n += 1
        ends = np.zeros(n + 1, dtype=np.int64)
        for t in range(num_tokens):
            for k in range(top_k):
                j = slot_of[ids[t, k]]
                if j >= 0:
                    ends[j + 1] += 1
        for j in range(n):
            ends[j + 1] += ends[j]
        fill = ends[:n].copy()
        tokens = np.empty(ends[n], dtype=np.int64)
        scale = np.empty(ends[n], dtype=np.float32)
        for t in range(num_tokens):
            for k in range(top_k):
                j = slot_of[ids[t, k]]
                if j >= 0:
                    tokens[fill[j]] = t
                    scale[fill[j]] = weights[t, k]
                    fill[j] += 1
        return n, experts, ends, tokens, scale

    return widen_bf16, e4m3_bits, assignments


@cache
def build_kernel(bf16: bool) -> Callable[..., None]:
    """The layer kernel for a bf16 (`uint16` bits) or an fp32 store (compiled once per process,
    on its first call): `layer(raw [E, N], on_cpu, ids, weights, x, out, D, I)`."""
    import numba

    widen_bf16, _, assignments = _helpers()
    if bf16:
        widen = widen_bf16
    else:
        @numba.njit(inline="always")
        def widen(v: Any) -> Any:
            return v

    @numba.njit(parallel=True, nogil=True, fastmath=True)
    def layer(raw: Any, on_cpu: Any, ids: Any, weights: Any, x: Any, out: Any, d: int,
              i: int) -> None:
        n, experts, ends, tokens, scale = assignments(on_cpu, ids, weights)
        act = np.empty((ends[n], i), dtype=np.float32)  # [P, I]
        for job in numba.prange(n * i):  # gate and up: one weight row of one expert per job
            j = job // i
            r = job - j * i
            block = raw[experts[j]]
            gate_row = block[r * d : (r + 1) * d]
            up_row = block[(i + r) * d : (i + r + 1) * d]
            for p in range(ends[j], ends[j + 1]):
                xt = x[tokens[p]]
                g = np.float32(0.0)
                for c in range(d):
                    g += widen(gate_row[c]) * xt[c]
                u = np.float32(0.0)
                for c in range(d):
                    u += widen(up_row[c]) * xt[c]
                act[p, r] = g / (np.float32(1.0) + np.exp(-g)) * u
        y = np.empty((ends[n], d), dtype=np.float32)  # [P, D]
        for job in numba.prange(n * d):  # down: one weight row of one expert per job
            j = job // d
            r = job - j * d
            down_row = raw[experts[j]][2 * i * d + r * i : 2 * i * d + (r + 1) * i]
            for p in range(ends[j], ends[j + 1]):
                ap = act[p]
                acc = np.float32(0.0)
                for c in range(i):
                    acc += widen(down_row[c]) * ap[c]
                y[p, r] = acc * scale[p]
        out[:] = 0.0
        for p in range(ends[n]):
            out[tokens[p]] += y[p]

    return layer


@cache
def build_fp8_kernel() -> Callable[..., None]:
    """The layer kernel for an FP8 store (compiled once per process, on its first call):
    `layer(raw [E, N] int8, scales [E, 2I + D] float32, on_cpu, ids, weights, x, out, D, I)`,
    `scales` a view of each block's scales (`ExpertLayout.scale_offset`)."""
    import numba

    _, e4m3_bits, assignments = _helpers()
    into = np.float32(E4M3_INPUT_FACTOR)
    per_row = np.float32(E4M3_ROW_FACTOR)

    # Strict arithmetic (no fastmath): reassociated, the products of two row scales and the
    # input factor (2^176) overflow float32; the flags are per instruction, so they stay strict
    # where LLVM inlines these into the fast loops.
    @numba.njit
    def gated(g: Any, gate_scale: Any, u: Any, up_scale: Any) -> Any:
        gate = g * gate_scale
        return gate / (np.float32(1.0) + np.exp(-gate)) * (u * up_scale) * into

    @numba.njit
    def scaled(acc: Any, row_scale: Any, weight: Any) -> Any:
        return acc * row_scale * weight

    @numba.njit(parallel=True, nogil=True, fastmath=True)
    def layer(raw: Any, scales: Any, on_cpu: Any, ids: Any, weights: Any, x: Any, out: Any,
              d: int, i: int) -> None:
        n, experts, ends, tokens, scale = assignments(on_cpu, ids, weights)
        xs = x * into  # [T, D] exact: a power of two
        act = np.empty((ends[n], i), dtype=np.float32)  # [P, I], times `into`
        for job in numba.prange(n * i):  # gate and up: one weight row of one expert per job
            j = job // i
            r = job - j * i
            e = experts[j]
            block = raw[e]
            gate_row = block[r * d : (r + 1) * d]
            up_row = block[(i + r) * d : (i + r + 1) * d]
            gate_scale = scales[e, r] * per_row
            up_scale = scales[e, i + r] * per_row
            for p in range(ends[j], ends[j + 1]):
                xt = xs[tokens[p]]
                g = np.float32(0.0)
                for c in range(d):
                    g += e4m3_bits(gate_row[c]) * xt[c]
                u = np.float32(0.0)
                for c in range(d):
                    u += e4m3_bits(up_row[c]) * xt[c]
                act[p, r] = gated(g, gate_scale, u, up_scale)
        y = np.empty((ends[n], d), dtype=np.float32)  # [P, D]
        for job in numba.prange(n * d):  # down: one weight row of one expert per job
            j = job // d
            r = job - j * d
            e = experts[j]
            down_row = raw[e][2 * i * d + r * i : 2 * i * d + (r + 1) * i]
            down_scale = scales[e, 2 * i + r] * per_row
            for p in range(ends[j], ends[j + 1]):
                ap = act[p]
                acc = np.float32(0.0)
                for c in range(i):
                    acc += e4m3_bits(down_row[c]) * ap[c]
                y[p, r] = scaled(acc, down_scale, scale[p])
        out[:] = 0.0
        for p in range(ends[n]):
            out[tokens[p]] += y[p]

    return layer


@cache
def _decoder() -> Callable[..., Any]:
    import numba

    _, e4m3_bits, _ = _helpers()
    into = np.float32(E4M3_INPUT_FACTOR)
    per_row = np.float32(E4M3_ROW_FACTOR)

    @numba.njit(fastmath=True)
    def decode(raw: Any) -> Any:
        out = np.empty(raw.size, dtype=np.float32)
        for c in range(raw.size):  # as the kernel: decoded, times an input, times a row scale
            out[c] = e4m3_bits(raw[c]) * into * per_row
        return out

    return decode


def decode_e4m3(raw: np.ndarray) -> np.ndarray:
    """e4m3 bytes `raw` (`uint8`) as float32, decoded as the FP8 kernel decodes them (compiled
    with its flags: a test of the decode is a test of the kernel's)."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8).view(np.int8)  # as the kernel reads them
    return _decoder()(raw)
