"""The torch definitions of the fused decode kernels: the fallback where Triton cannot run, and
the oracle the kernels are tested against.

Dimension key: T tokens, K experts per token, E routed experts (router) or head channels
(attention), D hidden, I expert width, W stacked weights, B batch, H query heads, G key/value
heads, R query heads per key/value head, S keys, N rows.

Each function restates an existing moe-core computation in one place, so the kernels have one
thing to agree with: `gathered_experts`, `attend`, `RMSNorm.forward` and `route`'s
`softmax_topk` rule.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_core.gathered_experts import gathered_experts

__all__ = [
    "add_rms_norm_reference",
    "decode_attention_reference",
    "moe_experts_reference",
    "rms_norm_reference",
    "softmax_topk_reference",
]


def moe_experts_reference(hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
                          gate: torch.Tensor, up: torch.Tensor,
                          down: torch.Tensor) -> torch.Tensor:
    """`sum_k weights[t, k] * down[j] @ (silu(gate[j] @ x_t) * (up[j] @ x_t))`, `j = index[t, k]`.

    Exactly `gathered_experts` with an index: gathers the T*K chosen matrices, then three batched
    products in the weights' dtype. Shapes: hidden `[T, D]`, index and weights `[T, K]`, gate and
    up `[W, I, D]`, down `[W, D, I]`; returns `[T, D]` in hidden's dtype.
    """
    return gathered_experts(hidden, index, weights, gate, up, down)


def decode_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               mask: torch.Tensor, scale: float) -> torch.Tensor:
    """One query per sequence: `softmax(q k^T * scale + mask) v` with grouped key/value heads.

    Shapes: q `[B, H, E]`, k and v `[B, S, G, E]` (query head h reads kv head `h // (H / G)`),
    mask `[B, S]` additive; returns `[B, H, E]` in q's dtype. The mask is cast to q's dtype as
    `attend` does (scaled_dot_product_attention wants them equal).
    """
    groups = q.shape[1] // k.shape[2]
    keys = k.transpose(1, 2).repeat_interleave(groups, dim=1)  # [B, H, S, E]
    values = v.transpose(1, 2).repeat_interleave(groups, dim=1)
    bias = mask[:, None, None, :].to(q.dtype)  # [B, 1, 1, S]
    out = F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=bias, scale=scale)
    return out[:, :, 0]  # [B, H, E]


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`weight * (x / rms(x))` in `RMSNorm.forward`'s rounding order.

    Statistics and scaling in float32, the result cast to x's dtype, *then* the weight multiply in
    torch's promoted dtype of (weight, x), so a bf16 weight rounds the product in bf16.
    """
    x32 = F.rms_norm(x.to(torch.float32), (x.shape[-1],), eps=eps)
    return weight * x32.to(x.dtype)


def add_rms_norm_reference(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`(x + delta, rms_norm(x + delta))`: a residual add and the norm that follows it."""
    summed = x + delta
    return summed, rms_norm_reference(summed, weight, eps)


def softmax_topk_reference(logits: torch.Tensor, k: int, normalize: bool,
                           scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`route`'s `softmax_topk` rule: softmax over E in float32, the top k, optionally
    renormalised to sum to one, times `scaling`.

    Shapes: logits `[T, E]`; returns `(ids [T, K] int64, weights [T, K] float32)`, each row in
    descending weight order.
    """
    scores = torch.softmax(logits, dim=-1, dtype=torch.float32)  # [T, E]
    weights, ids = torch.topk(scores, k=k, dim=-1)  # [T, K]
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights * scaling
