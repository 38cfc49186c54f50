"""Routed experts as grouped matrix products whose group boundaries never leave the device.

Dimension key: T tokens, K experts per token, J = T*K assignments, D hidden, I expert width,
E routed experts.

The grouped path of `LocalExperts` reads the routing on the host (expert counts, one loop over
the used experts); a captured decode step cannot, and at a few dozen tokens the gather path
(`gathered_experts`) copies every assignment's weights first, three times the bytes of reading
them once. Here the assignments are sorted by expert on the device, each expert's end row is
found with `searchsorted`, and `torch._grouped_mm` (CUTLASS grouped GEMM on Hopper) multiplies
each expert's rows by its own weights, read once, in three calls for the whole layer. The sums
over each token's K experts are taken in a fixed order (no atomics), so results repeat exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["device_grouped_experts", "device_grouped_supported"]

_grouped_mm = getattr(torch, "_grouped_mm", None)


def device_grouped_supported(hidden: torch.Tensor, gate: torch.Tensor) -> bool:
    """Whether `device_grouped_experts` runs for these inputs: CUDA, bf16, a torch with
    `_grouped_mm`, rows 16-byte aligned (CUTLASS's requirement)."""
    if _grouped_mm is None or not hidden.is_cuda or gate.dtype != torch.bfloat16:
        return False
    if hidden.dtype != torch.bfloat16:
        return False
    d, i = gate.shape[2], gate.shape[1]
    return (d * 2) % 16 == 0 and (i * 2) % 16 == 0


def device_grouped_experts(hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                           gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor
                           ) -> torch.Tensor:
    """`sum_k weights[t, k] * expert(expert_ids[t, k])(hidden[t])`, with no host read.

    Args:
        hidden: `[T, D]`.
        expert_ids: `[T, K]` int64 rows of the weight stacks.
        weights: `[T, K]` routing weights.
        gate: `[E, I, D]`; up: `[E, I, D]`; down: `[E, D, I]` (each expert's matrix row-major;
            any stride between experts).

    Returns:
        `[T, D]` in `hidden`'s dtype.
    """
    assert _grouped_mm is not None
    t, k = expert_ids.shape
    num_experts = gate.shape[0]
    flat = expert_ids.reshape(-1)  # [J]
    order = torch.argsort(flat, stable=True)  # [J] assignments grouped by expert
    ends = torch.searchsorted(flat[order], torch.arange(num_experts, device=flat.device),
                              right=True).to(torch.int32)  # [E] end row of each expert's group
    x = hidden.index_select(0, order // k)  # [J, D]
    g = _grouped_mm(x, gate.transpose(1, 2), offs=ends)  # [J, I]
    u = _grouped_mm(x, up.transpose(1, 2), offs=ends)  # [J, I]
    y = _grouped_mm(F.silu(g) * u, down.transpose(1, 2), offs=ends)  # [J, D]
    y = y * weights.reshape(-1)[order, None].to(y.dtype)
    unsorted = torch.empty_like(y).index_copy_(0, order, y)  # [J, D] in (token, k) order
    return unsorted.view(t, k, -1).sum(dim=1).to(hidden.dtype)  # [T, D]
