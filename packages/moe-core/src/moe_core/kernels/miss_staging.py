"""Which missed experts of a decode call are staged over PCIe before its in-place products, each
distinct expert once, found on the device in one kernel.

Dimension key: T tokens, K experts per token, J = T*K assignments, E experts of the layer,
R staging rows.

Why: the in-place product kernel (`mapped_experts`) reads a resident expert in its slot and a
missing one either in a staged row (copied over the link first by the copy kernel, which reads
host memory faster: 43-45 GB/s against the product kernel's own 36-39 on the H200, decision
0019) or in pinned host memory itself. Staging one row per *assignment* (the sixth session's
rule) made the workspace grow with T*K: at Qwen3-30B-A3B shapes it capped the path at 7 tokens
(FP8) or 3 (bf16), and a missed expert two tokens shared crossed the link twice. Here the call's
distinct missed experts get the rows, at most R of them (the workspace is R blocks whatever T
is); missed experts beyond R are read by the product kernel from host memory.

The plan is a device table, so nothing is read on the host and the call can be captured:
`call_lut[e]` is the call's source of expert e, the layer's table (`lut`: slot >= 0, -1 host,
-2 the CPU lane's) with staged experts rewritten to `-3 - r` (row r of the staging rows); and
`row_experts[r]` is the expert staged in row r, -1 for a row left empty. Rows go to missed
experts in expert order.
"""

from __future__ import annotations

import torch

from moe_core.kernels.backend import device_guard, next_power_of_2, triton_mode

__all__ = ["STAGED_BASE", "miss_staging_plan", "miss_staging_reference"]

STAGED_BASE = -3
"""`call_lut[e] == STAGED_BASE - r`: expert e is read from staging row r."""


def miss_staging_plan(ids: torch.Tensor, lut: torch.Tensor,
                      rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(call_lut [E], row_experts [rows])` for a call's assignments `ids` `[J]` over the layer
    table `lut` `[E]` (int64): each distinct expert that `ids` uses and `lut` leaves on the host
    (-1) gets a staging row, in expert order, while rows last. One kernel where Triton runs
    (graph-capturable), torch operations otherwise.

    Raises:
        ValueError: `rows` < 1, or `lut` not int64.
    """
    if rows < 1:
        raise ValueError(f"miss_staging_plan needs at least one staging row, got {rows}")
    if lut.dtype != torch.long:
        raise ValueError(f"miss_staging_plan: the expert table must be int64, got {lut.dtype}")
    mode = triton_mode(ids.device)
    if mode is None:
        return miss_staging_reference(ids, lut, rows)
    from moe_core.kernels.miss_staging_triton import kernels

    (kernel,) = kernels(mode)
    ids = ids.reshape(-1).contiguous()
    call_lut = torch.empty_like(lut)  # [E]
    row_experts = torch.empty(rows, dtype=torch.long, device=ids.device)  # [R]
    with device_guard(ids.device):
        kernel[(1,)](ids, lut, call_lut, row_experts, ids.numel(), lut.numel(), rows,
                     STAGED_BASE, BLOCK_J=max(2, next_power_of_2(ids.numel())),
                     BLOCK_E=max(2, next_power_of_2(lut.numel())),
                     BLOCK_R=max(2, next_power_of_2(rows)))
    return call_lut, row_experts


def miss_staging_reference(ids: torch.Tensor, lut: torch.Tensor,
                           rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`miss_staging_plan` in torch operations (the CPU path, and the tests' reference)."""
    used = torch.zeros(lut.numel(), dtype=torch.bool, device=lut.device)  # [E]
    used[ids.reshape(-1).to(torch.long)] = True
    miss = used & (lut == -1)
    rank = miss.to(torch.long).cumsum(0) - 1  # [E] the row of each missed expert
    staged = miss & (rank < rows)
    call_lut = torch.where(staged, STAGED_BASE - rank, lut)
    row_experts = torch.full((rows + 1,), -1, dtype=torch.long, device=lut.device)  # + a sink
    experts = torch.arange(lut.numel(), device=lut.device)
    row_experts.scatter_(0, torch.where(staged, rank, rows), experts)
    row_experts[rows] = -1
    return call_lut, row_experts[:rows]
