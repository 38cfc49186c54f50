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
from moe_core.kernels.qkv_rope import qkv_rope_store
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
    value once per group (`kernels.decode_attention`, decision 0007); otherwise keys and values
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
        self._qkv: tuple[torch.Tensor, torch.Tensor | None] | None = None  # fused, see below

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                cache: KVStore | None) -> torch.Tensor:
        """Attend `x` `[B, T, D]`; `rope` holds `cos, sin` `[B, T, E]`; returns `[B, T, D]`."""
        spec = self.spec
        b, t, _ = x.shape
        if x.is_cuda and t == 1 and self._decodes_fused(cache):
            return self._decode_fused(x, rope, mask, cache)
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
        if cache is not None and t == 1 and hasattr(cache, "attend_decode"):
            # A store that attends in place (`DecodeAttentionStore`): no keys come back.
            attended = cache.attend_decode(self.layer, (q[:, :, 0],), (k, v), 1,
                                           mask[:, 0, 0], self.scale)  # [B, H, E] float32
            return self.o_proj(attended.to(x.dtype).reshape(b, 1, -1))
        if cache is not None:
            k, v = cache.append(self.layer, k, v)  # [B, S, G, E]
        out = attend(q, k.transpose(1, 2), v.transpose(1, 2), mask, self.scale)  # [B, H, T, E]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    # The decode fast path -----------------------------------------------------------------

    def _decodes_fused(self, cache: KVStore | None) -> bool:
        """One token per row on CUDA into a cache that lets kernels write (`StaticKVCache`, or a
        paged pool that names each row's key slots: `key_slots`), with the options the fused
        prologue handles (per-head or no qk-norm, no clipping)."""
        spec = self.spec
        return (hasattr(cache, "write_target") and spec.qk_norm != "full"
                and spec.clip_qkv is None and self._fused_qkv() is not None)

    def _fused_qkv(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """One `[(H+2G)E, D]` weight (and bias) holding the three projections, which become views
        of it: one matrix-vector product per layer instead of three, no memory added. Made on
        the first decode outside a graph capture; None during a capture that precedes it."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        if self._qkv is not None and self._qkv[0].data_ptr() == self.q_proj.weight.data_ptr():
            return self._qkv
        if torch.cuda.is_current_stream_capturing():
            return None
        with torch.no_grad():
            weight = torch.cat([p.weight for p in projections])
            rows = [p.weight.shape[0] for p in projections]
            for proj, part in zip(projections, weight.split(rows), strict=True):
                proj.weight.data = part
            bias = None
            if self.spec.qkv_bias:
                bias = torch.cat([p.bias for p in projections])
                for proj, part in zip(projections, bias.split(rows), strict=True):
                    proj.bias.data = part
        self._qkv = (weight, bias)
        return self._qkv

    def _decode_fused(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                      mask: torch.Tensor, cache: KVStore | None) -> torch.Tensor:
        """The decode step's attention in five kernels: the fused projection, the prologue
        (qk-norm, rotary, cache write), split and combine of the attention, the output.

        A paged cache's `write_target` gives its arenas as one shared pool row `[1, N, G, E]`
        and a slot per row `[B]`, and its `key_slots` `[B, S]` the pool slots each row attends
        (the mask's S): the keys are read where they lie, nothing gathered."""
        spec = self.spec
        b = x.shape[0]
        fused = self._fused_qkv()
        assert fused is not None
        qkv = F.linear(x[:, 0], *fused)  # [B, (H+2G)E]
        tail = (spec.num_kv_heads, spec.head_dim)
        (k, v), slots = cache.write_target(self.layer, (tail, tail), x.dtype)  # type: ignore[union-attr]
        per_head = spec.qk_norm == "per_head"
        q_norm = self.q_norm.weight if per_head else None
        k_norm = self.k_norm.weight if per_head else None
        eps = self.q_norm.eps if per_head else 0.0
        cos, sin = rope
        q = qkv_rope_store(qkv, q_norm, k_norm, eps, cos[:, 0], sin[:, 0], k, v, slots,
                           spec.num_heads)  # [B, H, E]; k, v written at the slot(s)
        index = getattr(cache, "key_slots", None)  # [B, S] a paged cache's pool slots
        out = decode_attention(q, k, v, mask[:, 0, 0, :], self.scale, index)  # [B, H, E]
        return self.o_proj(out.reshape(b, 1, -1))
