"""Triton kernel of the miss-staging plan (`miss_staging`). Imported only on first use (see
`backend`).

Dimension key: J assignments, E experts of the layer, R staging rows.
"""

from __future__ import annotations

import functools

import triton.language as tl

from moe_core.kernels.backend import Kernel, Mode, jit

__all__ = ["kernels"]


def _miss_staging_kernel(ids_ptr, lut_ptr, call_lut_ptr, row_experts_ptr, num_ids, num_experts,
                         num_rows, staged_base, BLOCK_J: tl.constexpr, BLOCK_E: tl.constexpr,
                         BLOCK_R: tl.constexpr):
    """One program (grid `(1,)`): the call's used experts by comparing every id with every
    expert, the missed ones ranked by a prefix sum, the first `num_rows` given staging rows.

    Writes `call_lut [E]` (a staged expert's entry `staged_base - row`, the others `lut`'s) and
    `row_experts [R]` (the expert of each row, -1 where none).
    """
    j = tl.arange(0, BLOCK_J)
    e = tl.arange(0, BLOCK_E)
    e_ok = e < num_experts
    ids = tl.load(ids_ptr + j, mask=j < num_ids, other=-1)  # [BLOCK_J]
    hits = (ids[None, :] == e[:, None]).to(tl.int32)  # [BLOCK_E, BLOCK_J]
    used = tl.sum(hits, axis=1) > 0  # [BLOCK_E]
    lut = tl.load(lut_ptr + e, mask=e_ok, other=0)
    miss = used & (lut == -1) & e_ok
    rank = tl.cumsum(miss.to(tl.int32), axis=0) - 1  # [BLOCK_E]
    staged = miss & (rank < num_rows)
    tl.store(call_lut_ptr + e, tl.where(staged, staged_base - rank, lut), mask=e_ok)
    r = tl.arange(0, BLOCK_R)
    match = staged[None, :] & (rank[None, :] == r[:, None])  # [BLOCK_R, BLOCK_E]
    who = tl.sum(tl.where(match, e[None, :] + 1, 0), axis=1) - 1  # [BLOCK_R], -1: no expert
    tl.store(row_experts_ptr + r, who.to(tl.int64), mask=r < num_rows)


@functools.cache
def kernels(mode: Mode) -> tuple[Kernel]:
    """`(miss_staging,)` decorated for `mode`."""
    (kernel,) = jit((_miss_staging_kernel,), mode)
    return (kernel,)
