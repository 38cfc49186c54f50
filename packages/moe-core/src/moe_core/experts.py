"""The narrow interface through which a MoE block runs its routed experts, and the plain
implementation that holds every expert's weights in one place.

Dimension key: T tokens, K experts per token, E routed experts, D hidden, I expert width.

The model never touches expert weights itself: it routes, then hands `(hidden, ids, weights)` to
an `ExpertExecutor`. The offload runtime and the engines plug in other executors (streamed over
PCIe, cached in GPU slots, computed on the CPU) without changing the model code.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from moe_core.device_grouped_experts import device_grouped_experts, device_grouped_supported
from moe_core.gathered_experts import GATHER_LIMIT_BYTES, gathered_experts, use_gather
from moe_core.kernels import moe_experts, moe_experts_supported

__all__ = ["FUSED_MAX_ASSIGNMENTS", "ExpertExecutor", "LocalExperts"]

FUSED_MAX_ASSIGNMENTS = 16
"""Token-expert assignments (T * K) always computed by the fused decode kernels on CUDA, which
read each assignment's weights (an expert shared by several assignments once per assignment, L2
helping); they take up to E assignments (about one per expert) too. Above that the
device-grouped products, which read each used expert once, win. Measured on the H200 for
Qwen3-30B-A3B experts (E = 128, K = 8, `benchmarks/decode_kernels.py`): fused 79 us at 32
assignments, 237 us at 128 and 733 us at 512; the grouped path's captured decode steps (5.6,
9.9 and 13.9 ms for 24 layers at batch 4, 16 and 64) leave it roughly 170, 300 and 500 us per
layer."""


@runtime_checkable
class ExpertExecutor(Protocol):
    """Computes the weighted sum of each token's routed experts.

    Implementations must return, for every token t,
    `sum_j weights[t, j] * expert[ids[t, j]](hidden[t])`, in `hidden`'s dtype and device.
    """

    def __call__(self, hidden: torch.Tensor, expert_ids: torch.Tensor,
                 weights: torch.Tensor) -> torch.Tensor:
        """`hidden` `[T, D]`, `expert_ids` `[T, K]` int64, `weights` `[T, K]` -> `[T, D]`."""
        ...


class LocalExperts(nn.Module):
    """All routed experts of one layer as three stacked weight tensors on one device.

    Each expert is a gated SiLU MLP. The weights are held per projection, `[E, out, in]`, the
    layout `nn.Linear` uses per expert, so each expert's matrix product reads one contiguous block.
    Tokens are grouped by expert (one sort), and each used expert runs once on all its tokens; a
    few tokens (decode) instead gather their experts' matrices (`gathered_experts`).

    On CUDA nothing reads the routing on the host, so a decode step can be captured as a graph:
    a few assignments run through one fused kernel pair that reads each expert's weights in
    place (`kernels.moe_experts`), more through grouped products with device-side group
    boundaries (`device_grouped_experts`), and the gather path covers the rest.

    Attributes:
        graph_safe: Decode steps through it can be captured (see `decode_runner`).
        accepts_float32_weights: Routing weights may come in float32 (each path casts them
            where it multiplies; the MoE block then skips a cast kernel per layer).
        device_kernels: On CUDA, use the fused kernels and device-grouped products (False: the
            gather and grouped torch paths only, e.g. to compare executors that use them).
    """

    graph_safe = True
    accepts_float32_weights = True

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.gate_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.up_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.gather_limit_bytes = GATHER_LIMIT_BYTES  # 0: always group tokens by expert
        self.fused_max_assignments = FUSED_MAX_ASSIGNMENTS  # 0: never the fused kernels
        self.device_kernels = True

    def expert_forward(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        """One expert's MLP on `x` `[N, D]` -> `[N, D]`."""
        gate = F.linear(x, self.gate_proj[expert])  # [N, I]
        up = F.linear(x, self.up_proj[expert])
        return F.linear(F.silu(gate) * up, self.down_proj[expert])

    def forward(self, hidden: torch.Tensor, expert_ids: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
        """See `ExpertExecutor`. On CUDA: fused kernels for a few assignments, device-grouped
        products for more (neither reads the routing on the host). Few tokens take the gather
        path: no host sync, a fixed number of kernels; many take the grouped path: each used
        expert once on all its tokens."""
        stacks = (self.gate_proj, self.up_proj, self.down_proj)
        if hidden.is_cuda and self.device_kernels:
            fused_limit = max(self.fused_max_assignments, self.num_experts)
            if (expert_ids.numel() <= fused_limit and self.fused_max_assignments > 0
                    and moe_experts_supported(hidden, self.gate_proj)):
                return moe_experts(hidden, expert_ids, weights, *stacks)
            if device_grouped_supported(hidden, self.gate_proj):
                return device_grouped_experts(hidden, expert_ids, weights, *stacks)
        expert_bytes = 3 * self.gate_proj[0].numel() * self.gate_proj.element_size()
        if use_gather(expert_ids.numel(), expert_bytes, self.gather_limit_bytes):
            return gathered_experts(hidden, expert_ids, weights, self.gate_proj, self.up_proj,
                                    self.down_proj)
        k = expert_ids.shape[1]
        flat_ids = expert_ids.reshape(-1)  # [T*K]
        order = torch.argsort(flat_ids, stable=True)
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()
        token_of = order // k  # [T*K] token index of each sorted assignment
        flat_weights = weights.reshape(-1)[order].to(hidden.dtype)
        out = torch.zeros_like(hidden)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            rows = token_of[start : start + count]
            y = self.expert_forward(expert, hidden[rows])  # [N, D]
            out.index_add_(0, rows, y * flat_weights[start : start + count, None])
            start += count
        return out
