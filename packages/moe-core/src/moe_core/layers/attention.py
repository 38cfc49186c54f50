"""Grouped-query self-attention (Ainslie et al. 2023, arXiv:2305.13245) with the per-family
options: q/k/v biases (Qwen2), per-head qk-norm (Qwen3), whole-projection qk-norm and qkv clipping
(OLMoE).

Dimension key: B batch, T new tokens, S keys (cached + new), H query heads, G key/value heads,
E head channels, D hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_core.kernels import decode_attention, decode_attention_supported
from moe_core.kv_store import KVStore
from moe_core.layers.norm import RMSNorm
from moe_core.layers.rotary import apply_rotary
from moe_core.spec import AttentionSpec

__all__ = ["GQAAttention", "attend"]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
           scale: float) -> torch.Tensor:
    """Scaled dot-product attention of `q` `[B, H, T, E]` over `k`, `v` `[B, G, S, E]`.

    `mask` is additive `[B, 1, T, S]` (0 where allowed, a large negative number elsewhere), so a
    row with nothing to attend to (a padding query) stays finite instead of turning into NaN.

    A single query per row on CUDA (decode) runs a GQA-native kernel that reads each key and
    value once per group (`kernels.decode_attention`, decision 0006); otherwise keys and values
    are repeated per query head for SDPA, which copies the whole cache.
    """
    if q.is_cuda and q.shape[2] == 1:
        q1, k1, v1 = q[:, :, 0], k.transpose(1, 2), v.transpose(1, 2)  # [B, H, E], [B, S, G, E]
        if decode_attention_supported(q1, k1):
            return decode_attention(q1, k1, v1, mask[:, 0, 0, :], scale)[:, :, None]
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)  # [B, H, S, E]
        v = v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype), scale=scale)


class GQAAttention(nn.Module):
    """Multi-head attention whose key/value heads are shared by groups of query heads."""

    def __init__(self, spec: AttentionSpec, hidden_size: int, rms_norm_eps: float,
                 layer: int) -> None:
        super().__init__()
        self.spec = spec
        self.layer = layer
        h, g, e = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.q_proj = nn.Linear(hidden_size, h * e, bias=spec.qkv_bias)
        self.k_proj = nn.Linear(hidden_size, g * e, bias=spec.qkv_bias)
        self.v_proj = nn.Linear(hidden_size, g * e, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(h * e, hidden_size, bias=spec.o_bias)
        if spec.qk_norm == "per_head":
            self.q_norm = RMSNorm(e, rms_norm_eps)
            self.k_norm = RMSNorm(e, rms_norm_eps)
        elif spec.qk_norm == "full":
            self.q_norm = RMSNorm(h * e, rms_norm_eps)
            self.k_norm = RMSNorm(g * e, rms_norm_eps)
        self.scale = e**-0.5

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                cache: KVStore | None) -> torch.Tensor:
        """Attend `x` `[B, T, D]`; `rope` holds `cos, sin` `[B, T, E]`; returns `[B, T, D]`."""
        spec = self.spec
        b, t, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [B, T, H*E], [B, T, G*E] x2
        if spec.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if spec.clip_qkv is not None:
            q, k, v = (z.clamp(-spec.clip_qkv, spec.clip_qkv) for z in (q, k, v))
        q = q.view(b, t, spec.num_heads, spec.head_dim)  # [B, T, H, E]
        k = k.view(b, t, spec.num_kv_heads, spec.head_dim)  # [B, T, G, E]
        v = v.view(b, t, spec.num_kv_heads, spec.head_dim)
        if spec.qk_norm == "per_head":
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        q = apply_rotary(q.transpose(1, 2), cos, sin)  # [B, H, T, E]
        k = apply_rotary(k.transpose(1, 2), cos, sin).transpose(1, 2)  # [B, T, G, E]
        if cache is not None:
            k, v = cache.append(self.layer, k, v)  # [B, S, G, E]
        out = attend(q, k.transpose(1, 2), v.transpose(1, 2), mask, self.scale)  # [B, H, T, E]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))
