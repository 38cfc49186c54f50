"""Multi-head latent attention, DeepSeek-V2's MLA (arXiv:2405.04434 §2.1), as transformers runs it.

Dimension key: B batch, T new tokens, S keys (cached + new), H heads, D hidden, R kv latent
(`kv_lora_rank`), Q query latent (`q_lora_rank`), N no-rope channels per head, P rope channels,
V value channels per head.

Keys and values are compressed into one latent `[B, S, R]` plus one rotary key `[B, S, P]`
shared by all heads; that pair is all the cache holds (`R + P` values per token per layer instead
of `2 * H * (N + P)`).

Passes of several tokens (prefill) re-expand the latent with `kv_b_proj`, as transformers does,
so the rounding matches it. A single token per row (decode) absorbs `kv_b_proj` instead (the
paper's §2.1.2 "absorbed" form): the no-rope query is mapped into the latent space by each head's
key half of `kv_b_proj`, attends over the cached latent directly, and the attended latent is
mapped out by each head's value half. Decode then reads the `[S, R]` latent once per step
instead of expanding it to `[S, H, N + V]` keys and values for every layer (MoE-Gen measured
DeepSeek-V2 decode going from 31 to 49 tok/s from this alone). Scores and softmax are taken in
float32; fp32 logits stay within 1e-4 of the expanded form.
"""

from __future__ import annotations

import torch
from torch import nn

from moe_core.kv_store import KVStore
from moe_core.layers.attention import attend
from moe_core.layers.norm import RMSNorm
from moe_core.layers.rotary import apply_rotary, yarn_get_mscale
from moe_core.spec import AttentionSpec, RopeSpec

__all__ = ["MLAAttention", "mla_softmax_scale"]

# transformers builds both latent norms with RMSNorm's default epsilon, not `rms_norm_eps`.
_LATENT_NORM_EPS = 1e-6


def mla_softmax_scale(attention: AttentionSpec, rope: RopeSpec) -> float:
    """`head_dim ** -0.5`, times YaRN's `mscale(factor, mscale_all_dim) ** 2`.

    The YaRN factor applies only when rope is scaled.
    """
    scale = attention.head_dim**-0.5
    if rope.scaling != "default" and rope.mscale_all_dim:
        m = yarn_get_mscale(rope.factor, rope.mscale_all_dim)
        scale *= m * m
    return scale


class MLAAttention(nn.Module):
    """DeepSeek-V2/V3 attention over a compressed key/value latent."""

    def __init__(self, spec: AttentionSpec, hidden_size: int, rms_norm_eps: float, layer: int,
                 rope: RopeSpec, interleaved_rope: bool) -> None:
        super().__init__()
        del rms_norm_eps  # the latent norms use a fixed epsilon (see _LATENT_NORM_EPS)
        assert spec.kv_lora_rank is not None and spec.qk_rope_head_dim is not None
        self.spec = spec
        self.layer = layer
        self.interleaved_rope = interleaved_rope
        h, rank, rope_dim = spec.num_heads, spec.kv_lora_rank, spec.qk_rope_head_dim
        if spec.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden_size, h * spec.head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden_size, spec.q_lora_rank, bias=spec.qkv_bias)
            self.q_a_layernorm = RMSNorm(spec.q_lora_rank, _LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(spec.q_lora_rank, h * spec.head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden_size, rank + rope_dim, bias=spec.qkv_bias)
        self.kv_a_layernorm = RMSNorm(rank, _LATENT_NORM_EPS)
        nope = spec.qk_nope_head_dim
        assert nope is not None
        self.kv_b_proj = nn.Linear(rank, h * (nope + spec.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * spec.v_head_dim, hidden_size, bias=spec.o_bias)
        self.scale = mla_softmax_scale(spec, rope)
        self.absorb_at_decode = True  # False: decode re-expands the latent like prefill

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.q_lora_rank is None:
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                cache: KVStore | None) -> torch.Tensor:
        """Attend `x` `[B, T, D]`; `rope` holds `cos, sin` `[B, T, P]`; returns `[B, T, D]`."""
        spec = self.spec
        b, t, _ = x.shape
        h, nope, rope_dim = spec.num_heads, spec.qk_nope_head_dim, spec.qk_rope_head_dim
        assert nope is not None and rope_dim is not None and spec.kv_lora_rank is not None
        q = self._queries(x).view(b, t, h, spec.head_dim).transpose(1, 2)  # [B, H, T, N+P]
        q_nope, q_pe = q.split([nope, rope_dim], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([spec.kv_lora_rank, rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)  # [B, T, R]
        cos, sin = rope
        q_pe = apply_rotary(q_pe, cos, sin, self.interleaved_rope)  # [B, H, T, P]
        k_pe = apply_rotary(k_pe[:, None], cos, sin, self.interleaved_rope)[:, 0]  # [B, T, P]
        if (cache is not None and t == 1 and self.absorb_at_decode
                and hasattr(cache, "attend_decode")):
            # A store that attends in place (`DecodeAttentionStore`): the latent is the key
            # of the absorbed query and the value.
            q_latent = self._absorb_query(q_nope[:, :, 0])  # [B, H, R]
            attended = cache.attend_decode(self.layer, (q_latent, q_pe[:, :, 0]),
                                           (latent, k_pe), 0, mask[:, 0, 0], self.scale)
            out = self._absorb_output(attended.to(latent.dtype))  # [B, H, V]
            return self.o_proj(out.reshape(b, 1, -1))  # [B, 1, D]
        if cache is not None:
            latent, k_pe = cache.append(self.layer, latent, k_pe)  # [B, S, R], [B, S, P]
        if t == 1 and self.absorb_at_decode:
            out = self._absorbed(q_nope[:, :, 0], q_pe[:, :, 0], latent, k_pe, mask[:, 0])
            return self.o_proj(out.reshape(b, 1, -1))  # [B, 1, D]
        s = latent.shape[1]
        kv = self.kv_b_proj(latent).view(b, s, h, nope + spec.v_head_dim).transpose(1, 2)
        k_nope, v = kv.split([nope, spec.v_head_dim], dim=-1)  # [B, H, S, N], [B, H, S, V]
        k = torch.cat((k_nope, k_pe[:, None].expand(b, h, s, rope_dim)), dim=-1)  # [B, H, S, N+P]
        q = torch.cat((q_nope, q_pe), dim=-1)  # [B, H, T, N+P]
        out = attend(q, k, v, mask, self.scale)  # [B, H, T, V]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def _absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
                  k_pe: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One query per row over the cached latent, `kv_b_proj` folded into both sides.

        Args:
            q_nope: `[B, H, N]`; q_pe: `[B, H, P]` (rotated).
            latent: `[B, S, R]` normalised latent; k_pe: `[B, S, P]` rotated keys.
            mask: Additive `[B, 1, S]`.

        Returns:
            The attended values `[B, H, V]` in the model dtype.
        """
        q_latent = self._absorb_query(q_nope)  # [B, H, R]
        f32 = torch.float32
        scores = (torch.bmm(q_latent.to(f32), latent.to(f32).transpose(1, 2))
                  + torch.bmm(q_pe.to(f32), k_pe.to(f32).transpose(1, 2)))  # [B, H, S]
        probs = torch.softmax(scores * self.scale + mask.to(f32), dim=-1)  # [B, H, S]
        attended = torch.bmm(probs, latent.to(f32)).to(latent.dtype)  # [B, H, R]
        return self._absorb_output(attended)

    def _absorb_halves(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each head's key and value halves of `kv_b_proj`: `[H, N, R]`, `[H, V, R]`."""
        spec = self.spec
        h, nope = spec.num_heads, spec.qk_nope_head_dim
        assert nope is not None and spec.kv_lora_rank is not None
        w = self.kv_b_proj.weight.view(h, nope + spec.v_head_dim, spec.kv_lora_rank)
        return w[:, :nope], w[:, nope:]

    def _absorb_query(self, q_nope: torch.Tensor) -> torch.Tensor:
        """The no-rope query `[B, H, N]` mapped into the latent space `[B, H, R]`."""
        w_uk = self._absorb_halves()[0]
        return torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)

    def _absorb_output(self, attended: torch.Tensor) -> torch.Tensor:
        """The attended latent `[B, H, R]` mapped out to each head's values `[B, H, V]`."""
        w_uv = self._absorb_halves()[1]
        return torch.bmm(attended.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)
