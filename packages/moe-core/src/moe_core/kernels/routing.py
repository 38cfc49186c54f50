"""The softmax top-k router (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2 `greedy`) in one kernel.

Dimension key: T tokens, E routed experts, K experts per token.

Why: `route`'s softmax, topk, sum, divide and scale are five or six kernels per MoE layer at
decode, each on a few hundred floats; one kernel does them all.

Ties: among equal probabilities the lowest expert id is taken first. `torch.topk` leaves the
order of ties unspecified, so on tied logits the chosen set may differ from `route`'s where a tie
straddles the K-th place. Rows come out in descending weight order, like `route`'s; callers sum
over K, so the order within a row does not matter to them.
"""

from __future__ import annotations

import torch

from moe_core.kernels.backend import Mode, device_guard, next_power_of_2, triton_mode
from moe_core.kernels.reference import softmax_topk_reference

__all__ = ["MAX_ROUTED_EXPERTS", "softmax_topk"]

MAX_ROUTED_EXPERTS = 1024
"""Most experts per router row for the kernel: one program holds the row in registers."""


def softmax_topk(logits: torch.Tensor, k: int, normalize: bool,
                 scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`route`'s `softmax_topk` rule: softmax over E in float32, top k, optional
    renormalisation to sum one, times `scaling`.

    Args:
        logits: `[T, E]` router logits, any float dtype; last dim contiguous.
        k: Experts per token (`1 <= k <= E`).
        normalize: Rescale the chosen weights to sum to one before `scaling`.
        scaling: Multiplier on the weights (DeepSeek's `routed_scaling_factor`).

    Returns:
        `(ids [T, K] int64, weights [T, K] float32)`, each row in descending weight order, ties
        to the lowest id.
    """
    mode = triton_mode(logits.device)
    if (mode is None or logits.dim() != 2 or logits.shape[0] == 0
            or not logits.is_floating_point() or logits.dtype == torch.float64
            or not 1 <= k <= logits.shape[1] <= MAX_ROUTED_EXPERTS or logits.stride(-1) != 1):
        return softmax_topk_reference(logits, k, normalize, scaling)
    return _launch(logits, k, normalize, scaling, mode)


def _launch(logits: torch.Tensor, k: int, normalize: bool, scaling: float,
            mode: Mode) -> tuple[torch.Tensor, torch.Tensor]:
    from moe_core.kernels.routing_triton import kernels

    (kernel,) = kernels(mode)
    t, e = logits.shape
    ids = torch.empty(t, k, dtype=torch.int64, device=logits.device)  # [T, K]
    weights = torch.empty(t, k, dtype=torch.float32, device=logits.device)  # [T, K]
    block_e = next_power_of_2(e)
    with device_guard(logits.device):
        # One warp per row up to 256 experts: the K rounds of max/min stay warp shuffles.
        kernel[(t,)](logits, ids, weights, e, k, logits.stride(0), float(scaling),
                     NORMALIZE=bool(normalize), BLOCK_E=block_e,
                     BLOCK_K=max(2, next_power_of_2(k)),
                     num_warps=1 if block_e <= 256 else 2 if block_e <= 512 else 4)
    return ids, weights
