"""RMSNorm (Zhang & Sennrich 2019), computed in float32 as transformers does."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_core.kernels import add_rms_norm, rms_norm, rms_norm_supported

__all__ = ["RMSNorm"]


class RMSNorm(nn.Module):
    """`weight * x / rms(x)` over the last dimension.

    The statistics are taken in float32 and the result is cast back before the weight multiply,
    the order transformers uses, so bf16 outputs round the same way.
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and rms_norm_supported(x, self.weight):
            # One kernel instead of four (cast, statistics, cast back, weight multiply): a
            # decode step runs four norms per layer, and at batch 1 it is bound by launches.
            return rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        # One fused kernel for the statistics and the scaling (five separate ones before: at
        # batch-1 decode the step is bound by kernel launches, four norms per layer).
        x32 = F.rms_norm(x.to(torch.float32), (x.shape[-1],), eps=self.eps)
        return self.weight * x32.to(dtype)

    def add_forward(self, x: torch.Tensor, delta: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(x + delta, norm(x + delta))`: a residual add and the next norm, one kernel on the
        GPU (the sum rounds exactly as `x + delta` does)."""
        if x.is_cuda and rms_norm_supported(x, self.weight) and delta.dtype == x.dtype:
            return add_rms_norm(x, delta, self.weight, self.eps)
        summed = x + delta
        return summed, self(summed)
