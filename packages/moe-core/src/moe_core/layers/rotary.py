"""Rotary position embeddings (Su et al. 2021, arXiv:2104.09864), with linear and YaRN scaling
(Peng et al. 2023, arXiv:2309.00071) computed exactly as transformers does.

Dimension key: B batch, T tokens, H heads, R rotary channels.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moe_core.kernels.rotary import rotary, rotary_supported
from moe_core.spec import RopeSpec

__all__ = ["RotaryEmbedding", "apply_rotary", "yarn_get_mscale"]


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: `0.1 * mscale * ln(scale) + 1` for `scale > 1`, else 1."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(spec: RopeSpec, base_freqs: torch.Tensor) -> torch.Tensor:
    """Blend interpolated (low-frequency) and extrapolated (high-frequency) inverse frequencies."""
    dim, base, factor = spec.rotary_dim, spec.theta, spec.factor
    original = spec.original_max_position_embeddings
    assert original is not None, "yarn needs original_max_position_embeddings"

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(spec.beta_fast), correction_dim(spec.beta_slow)
    if spec.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # the ramp would divide by zero
    positions = torch.arange(dim // 2, dtype=torch.float32, device="cpu")
    ramp = torch.clamp((positions - low) / (high - low), 0, 1)
    extrapolation_share = 1 - ramp
    extrapolated = 1.0 / base_freqs
    interpolated = 1.0 / (factor * base_freqs)
    return interpolated * (1 - extrapolation_share) + extrapolated * extrapolation_share


def _attention_factor(spec: RopeSpec) -> float:
    """The factor cos and sin are multiplied by (1 except for YaRN)."""
    if spec.scaling != "yarn":
        return 1.0
    if spec.attention_factor is not None:
        return spec.attention_factor
    if spec.mscale and spec.mscale_all_dim:
        return yarn_get_mscale(spec.factor, spec.mscale) / yarn_get_mscale(
            spec.factor, spec.mscale_all_dim)
    return yarn_get_mscale(spec.factor)


class RotaryEmbedding(nn.Module):
    """Computes `cos` and `sin` tables `[B, T, R]` for given positions."""

    def __init__(self, spec: RopeSpec) -> None:
        super().__init__()
        self.spec = spec
        exponents = torch.arange(0, spec.rotary_dim, 2, dtype=torch.int64, device="cpu")
        exponents = exponents.to(torch.float32)
        base_freqs = spec.theta ** (exponents / spec.rotary_dim)  # [R/2]
        if spec.scaling == "yarn":
            inv_freq = _yarn_inv_freq(spec, base_freqs)
        else:
            inv_freq = 1.0 / base_freqs
            if spec.scaling == "linear":
                inv_freq = inv_freq / spec.factor
        # Not a weight: kept off the module's buffers so that building the model on the meta
        # device and materialising it later cannot lose it; copied once per device.
        self.inv_freq = inv_freq  # [R/2]
        self._inv_freq_on: dict[torch.device, torch.Tensor] = {}
        self.attention_factor = _attention_factor(spec)

    @torch.no_grad()
    def forward(self, positions: torch.Tensor,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """`cos, sin` of shape `[B, T, R]` in `dtype` for integer `positions` `[B, T]`."""
        inv_freq = self._inv_freq_on.get(positions.device)
        if inv_freq is None:
            inv_freq = self._inv_freq_on[positions.device] = self.inv_freq.to(positions.device)
        freqs = positions.to(torch.float32)[..., None] * inv_freq  # [B, T, R/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, R]
        cos = emb.cos() * self.attention_factor
        sin = emb.sin() * self.attention_factor
        return cos.to(dtype), sin.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 interleaved: bool = False) -> torch.Tensor:
    """Rotate `x` `[B, H, T, R]` by the tables `[B, T, R]`.

    With `interleaved`, channel pairs are adjacent (`x0 x1 | x2 x3 ...`, DeepSeek's layout); they
    are first regrouped into halves, so the output is in the halves layout. Queries and keys get
    the same regrouping, so their dot products are unchanged.
    """
    if interleaved:
        b, h, t, r = x.shape
        x = x.view(b, h, t, r // 2, 2).transpose(-1, -2).reshape(b, h, t, r)
    elif x.is_cuda and rotary_supported(x, cos):
        return rotary(x, cos, sin)  # one kernel instead of six (decode is bound by launches)
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, R]
    return x * cos + _rotate_half(x) * sin
