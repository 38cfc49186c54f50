"""Decode attention over the host KV pages, read where they lie: the host's attention kernel.

Dimension key: b sequences, H query heads, G key/value groups (MLA: 1, its latent is shared by
every head), E_i channels of key part i, V value channels, P the longest past, N arena slots.

One query per sequence attends over its cached keys (the past, addressed slot by slot through
the micro-batch's gather index, never copied) and its new key (not yet written back: the mover
writes new entries at the end of the step):

    out[b, h] = sum_s softmax_s(scale * sum_i q_i[b, h] . K_i[s, g(h)] + bias[b, s]) V[s, g(h)]

Key parts generalise both attention kinds: GQA scores one part (the keys) and reads the values
from the second arena; MLA (absorbed, decision 0007) scores the latent and the rotary key and
reads the latent again as its values. The additive `bias` row is the engine's own mask (padding,
causality, sliding windows), so the kernel attends exactly the keys the torch path attends.

Why a kernel: torch's CPU path gathers the past into a staging buffer, concatenates the new key,
repeats each group's keys for every head of the group and runs SDPA with a mask; on the H200 host
that attended ~0.4 M keys/s in situ, far below what host memory can stream (docs/moe-gen.md).
`NumbaPagedAttention` reads each key and value once per group straight from the arena (bf16
widened in registers), keeps an online softmax per head (flash-decoding's recurrence, so scores
for a whole context are never stored), and runs the sequences in parallel without
the GIL, so the GPU's part of the step proceeds meanwhile.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import torch

__all__ = ["NumbaPagedAttention", "PagedAttentionKernel", "paged_attention_reference",
           "time_paged_attention"]


class PagedAttentionKernel(Protocol):
    """Attends one query per sequence over paged host KV (see the module docstring)."""

    name: str

    def __call__(self, queries: Sequence[torch.Tensor], arenas: Sequence[torch.Tensor],
                 new: Sequence[torch.Tensor], value_index: int, slots: torch.Tensor,
                 num_past: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
        """Args:
            queries: Per key part, `[b, H, E_i]`.
            arenas: Per cached tensor, `[N, G, E_i]` (bf16 or float32, on the host); the first
                `len(queries)` are key parts, `arenas[value_index]` holds the values.
            new: Per cached tensor, the new entry `[b, G, E_i]`.
            value_index: Which arena (and new entry) holds the values.
            slots: `[b, P]` int64 arena slot of each past key (entries past a sequence's own
                `num_past` are ignored).
            num_past: `[b]` int64 cached keys of each sequence.
            bias: `[b, P + 1]` float32 additive mask; column `P` belongs to the new key.
            scale: Softmax scale.

        Returns:
            `[b, H, V]` float32.
        """
        ...


def _flat(x: torch.Tensor) -> np.ndarray:
    """A host tensor as the numpy array the kernel reads: bf16 as its raw `uint16` bits."""
    x = x.contiguous()
    if x.dtype == torch.bfloat16:
        return x.view(torch.int16).numpy().view(np.uint16)
    return x.numpy()


class NumbaPagedAttention:
    """The numba kernel: the sequences in parallel, without the GIL.

    Compiled on first use per arena dtype (seconds); `warm_up` does it ahead of time.
    """

    name = "numba"

    def warm_up(self, dtype: torch.dtype) -> None:
        """Compile for arenas of `dtype` now (otherwise the first call does)."""
        g, e = 1, 4
        arena = torch.zeros(2, g, e, dtype=dtype)
        q = torch.zeros(1, 1, e)
        self((q,), (arena, arena), (q, q), 1, torch.zeros(1, 1, dtype=torch.long),
             torch.ones(1, dtype=torch.long), torch.zeros(1, 2), 1.0)

    def __call__(self, queries: Sequence[torch.Tensor], arenas: Sequence[torch.Tensor],
                 new: Sequence[torch.Tensor], value_index: int, slots: torch.Tensor,
                 num_past: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
        if len(queries) not in (1, 2) or len(queries) > len(arenas):
            raise ValueError(f"the numba paged attention takes one or two key parts, got "
                             f"{len(queries)} for {len(arenas)} arenas")
        dtypes = {a.dtype for a in arenas}
        if len(dtypes) != 1 or next(iter(dtypes)) not in (torch.bfloat16, torch.float32):
            raise ValueError(f"the numba paged attention reads bf16 or float32 arenas, got "
                             f"{sorted(str(d) for d in dtypes)}")
        b, h, _ = queries[0].shape
        values = arenas[value_index]
        out = torch.empty(b, h, values.shape[2])
        f32 = [q.float().contiguous() for q in queries]
        new32 = [n.float().contiguous() for n in new]
        if len(queries) == 1:  # a second, empty key part: one kernel serves both kinds
            f32.append(torch.zeros(b, h, 0))  # fresh, contiguous: the same compiled signature
            new32.append(torch.zeros(b, new32[0].shape[1], 0))
            second = torch.zeros(1, arenas[0].shape[1], 0, dtype=arenas[0].dtype)
        else:
            second = arenas[1]
        kernel = _compiled()
        kernel(f32[0].numpy(), _flat(arenas[0]), new32[0].numpy(),
               f32[1].numpy(), _flat(second), new32[1].numpy(),
               _flat(values), new32[value_index].numpy(),
               slots.contiguous().numpy(), num_past.contiguous().numpy(),
               bias.float().contiguous().numpy(), np.float32(scale), out.numpy())
        return out


def paged_attention_reference(queries: Sequence[torch.Tensor], arenas: Sequence[torch.Tensor],
                              new: Sequence[torch.Tensor], value_index: int, slots: torch.Tensor,
                              num_past: torch.Tensor, bias: torch.Tensor, scale: float
                              ) -> torch.Tensor:
    """The same attention in float64 with torch, sequence by sequence (tests' reference)."""
    f64 = torch.float64
    b, h, _ = queries[0].shape
    g = arenas[value_index].shape[1]
    out = torch.empty(b, h, arenas[value_index].shape[2], dtype=f64)
    for i in range(b):
        rows = slots[i, : int(num_past[i])]
        scores = torch.zeros(h, len(rows) + 1, dtype=f64)
        for q, arena, fresh in zip(queries, arenas, new, strict=False):
            keys = torch.cat((arena[rows], fresh[i][None])).to(f64)  # [S, G, E]
            keys = keys.repeat_interleave(h // g, dim=1)  # [S, H, E]
            scores += torch.einsum("he,she->hs", q[i].to(f64), keys)
        cols = torch.cat((torch.arange(len(rows)), torch.tensor([bias.shape[1] - 1])))
        probs = torch.softmax(scores * scale + bias[i, cols].to(f64), dim=-1)  # [H, S]
        vals = torch.cat((arenas[value_index][rows], new[value_index][i][None])).to(f64)
        out[i] = torch.einsum("hs,she->he", probs, vals.repeat_interleave(h // g, dim=1))
    return out.float()


def time_paged_attention(kernel: PagedAttentionKernel, num_heads: int, key_parts: Sequence[int],
                         value_part: int, num_groups: int, dtype: torch.dtype, batch: int,
                         keys: int, repeats: int = 3) -> tuple[float, int]:
    """Best seconds of one call over `batch` sequences of `keys` keys each, in shuffled pages
    of 16 slots (as the engine's arenas hold them), and the KV bytes that call reads.

    Args:
        key_parts: Channels of each key arena (GQA: `[E]`; MLA: `[R, Q]`).
        value_part: Which of the arenas holds the values; `len(key_parts)` for a separate one
            of `key_parts[0]` channels (GQA's values).
    """
    page = 16
    pages = batch * -(-keys // page)
    widths = list(key_parts) + ([key_parts[0]] if value_part == len(key_parts) else [])
    arenas = [torch.randn(pages * page, num_groups, w).to(dtype) for w in widths]
    order = torch.randperm(pages).view(batch, -1)  # [b, pages each]
    pos = torch.arange(keys - 1)
    slots = (order[:, pos // page] * page + pos % page).contiguous()  # [b, P]
    queries = [torch.randn(batch, num_heads, w) for w in key_parts]
    new = [torch.randn(batch, num_groups, w) for w in widths]
    past = torch.full((batch,), keys - 1, dtype=torch.long)
    bias = torch.zeros(batch, keys)

    def call() -> torch.Tensor:
        return kernel(queries, arenas, new, value_part, slots, past, bias, 0.1)

    call()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    read = {id(a): a for a in arenas}  # MLA's latent is one arena, read once per key
    nbytes = batch * (keys - 1) * sum(a[0].numel() * a.element_size() for a in read.values())
    return max(best, 1e-9), nbytes


def _compiled() -> Callable[..., None]:
    """The kernel (numba compiles it once per arena dtype it meets and caches the machine code
    on disk, so later processes skip the seconds of compilation)."""
    from moe_gen import paged_attention_numba

    return paged_attention_numba.attend
