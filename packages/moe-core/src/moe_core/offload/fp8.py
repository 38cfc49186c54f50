"""FP8 expert weights: e4m3 with one float32 scale per output channel (issue 18, item 2).

Dimension key: E experts, O output channels of a projection, C its input channels, I expert
width, D hidden.

Why: a streamed expert's bytes over PCIe are what large-batch offloaded decode waits on
(docs/moe-gen.md); e4m3 halves them against bf16. Each row of a projection (one output channel)
gets its own scale, `amax(|row|) / 448` (448 is e4m3's largest finite value), so a row's largest
weight lands on the format's largest value and small rows keep their resolution: the rounding
error of a weight is at most 2^-4 of its row's amax relative (e4m3 keeps 3 mantissa bits), far
below what per-tensor scales give on rows of different magnitudes.

An FP8 block (`ExpertLayout` with `dtype=FP8`) holds the three projections' e4m3 weights in the
usual order, then their scales: `[gate I][up I][down D]` float32. Weights and scales travel in one
copy; the device dequantises them (`dequantized_grouped`) into the activations' dtype just before
the products, so compute is bf16 (or float32 on the CPU) as before. `torch._scaled_mm` on Hopper
could multiply the e4m3 weights directly; that is a later optimisation.
"""

from __future__ import annotations

import torch

__all__ = ["FP8", "FP8_MAX", "dequantize_rows", "quantize_rows"]

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
_TINY = 1e-12  # an all-zero row keeps a finite scale


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`w` `[..., O, C]` as e4m3 `[..., O, C]` and float32 scales `[..., O]` (per row)."""
    w32 = w.float()
    scale = w32.abs().amax(dim=-1).clamp_min(_TINY) / FP8_MAX  # [..., O]
    q = (w32 / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """e4m3 `q` `[..., O, C]` times its row scales `[..., O]`, in `dtype` (scaled in float32,
    rounded once).

    The weights are widened straight into the result (e4m3 is exact in bf16, fp16 and float32)
    and scaled in place: type promotion multiplies in float32 and rounds the product to `dtype`,
    bit for bit what scaling a float32 copy gave, without that copy (4 bytes a weight of
    workspace: 151 MB per batch-1 layer call of Qwen3-30B-A3B)."""
    out = q.to(dtype)
    return out.mul_(scale[..., None])
