"""Triton kernel of the softmax top-k router. Imported only on first use (see `backend`).

Dimension key: T tokens, E routed experts, K experts per token.
"""

from __future__ import annotations

import functools

import triton.language as tl

from moe_core.kernels.backend import Kernel, Mode, jit

__all__ = ["kernels"]


def _softmax_topk_kernel(logits_ptr, ids_ptr, weights_ptr, num_experts, top_k, stride_lt,
                         scaling, NORMALIZE: tl.constexpr, BLOCK_E: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    """One token per program (grid `(T,)`): softmax over the row in float32, then K rounds of
    "take the largest, lowest index first among equals, and knock it out".

    Writes `ids [T, K]` int64 and `weights [T, K]` float32 (contiguous), best first.
    """
    t = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    e_ok = e < num_experts
    x = tl.load(logits_ptr + t * stride_lt + e, mask=e_ok, other=float("-inf")).to(tl.float32)
    p = tl.exp(x - tl.max(x, axis=0))
    p = p / tl.sum(p, axis=0)  # [BLOCK_E]
    # Chosen experts become -1, padding lanes -2: below every probability, never chosen.
    p = tl.where(e_ok, p, -2.0)
    j = tl.arange(0, BLOCK_K)
    top_w = tl.zeros([BLOCK_K], dtype=tl.float32)
    top_i = tl.zeros([BLOCK_K], dtype=tl.int32)
    for n in range(top_k):
        best = tl.max(p, axis=0)
        at = tl.min(tl.where(p == best, e, BLOCK_E), axis=0)
        top_w = tl.where(j == n, best, top_w)
        top_i = tl.where(j == n, at, top_i)
        p = tl.where(e == at, -1.0, p)
    if NORMALIZE:
        top_w = top_w / tl.sum(top_w, axis=0)  # lanes >= K hold 0
    top_w = top_w * scaling
    j_ok = j < top_k
    tl.store(ids_ptr + t * top_k + j, top_i.to(tl.int64), mask=j_ok)
    tl.store(weights_ptr + t * top_k + j, top_w, mask=j_ok)


@functools.cache
def kernels(mode: Mode) -> tuple[Kernel]:
    """`(softmax_topk,)` decorated for `mode`."""
    (softmax_topk,) = jit((_softmax_topk_kernel,), mode)
    return (softmax_topk,)
