"""The attention prologue of a decode step in one kernel: split the fused q/k/v projection, apply
the per-head qk-norm (Qwen3) and the rotary embedding, write the new key and value into the cache.

Dimension key: B batch, H query heads, G key/value heads, E head channels, C cache slots,
W = (H+2G)*E.

In torch this is six kernels per layer (two norms, two rotations, two cache writes), each a few
microseconds of launch and tail for a few kilobytes of data: at batch 1 a decode step is bound by
such launches. One token per row only (decode).
"""

from __future__ import annotations

import torch

from moe_core.kernels.backend import Mode, device_guard, next_power_of_2, triton_mode
from moe_core.kernels.rotary import rotary_reference

__all__ = ["qkv_rope_store", "qkv_rope_store_reference", "qkv_rope_supported"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def _norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`RMSNorm.forward`'s arithmetic."""
    x32 = torch.nn.functional.rms_norm(x.to(torch.float32), (x.shape[-1],), eps=eps)
    return weight * x32.to(x.dtype)


def qkv_rope_store_reference(qkv: torch.Tensor, q_norm: torch.Tensor | None,
                             k_norm: torch.Tensor | None, eps: float, cos: torch.Tensor,
                             sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             slot: torch.Tensor, num_heads: int) -> torch.Tensor:
    """See `qkv_rope_store`, in torch."""
    b = qkv.shape[0]
    g, e = k_cache.shape[2], k_cache.shape[3]
    q, k, v = qkv.split([num_heads * e, g * e, g * e], dim=-1)
    q, k, v = q.reshape(b, num_heads, e), k.reshape(b, g, e), v.reshape(b, g, e)
    if q_norm is not None and k_norm is not None:
        q, k = _norm_reference(q, q_norm, eps), _norm_reference(k, k_norm, eps)
    q = rotary_reference(q[:, :, None], cos[:, None], sin[:, None])[:, :, 0]  # [B, H, E]
    k = rotary_reference(k[:, :, None], cos[:, None], sin[:, None])[:, :, 0]  # [B, G, E]
    if _shared_pool(b, k_cache, slot):  # row b's entries at slot[b] of the one pool row
        k_cache[0].index_copy_(0, slot, k.to(k_cache.dtype))
        v_cache[0].index_copy_(0, slot, v.to(v_cache.dtype))
    else:
        k_cache.index_copy_(1, slot, k[:, None].to(k_cache.dtype))
        v_cache.index_copy_(1, slot, v[:, None].to(v_cache.dtype))
    return q.contiguous()


def _shared_pool(rows: int, k_cache: torch.Tensor, slot: torch.Tensor) -> bool:
    """Whether the cache is one pool row `[1, N, G, E]` written at a slot per row (`slot`
    `[B]`), rather than `[B, C, G, E]` written at one slot `[1]` for all rows.

    Raises:
        ValueError: the slots fit neither layout.
    """
    if k_cache.shape[0] == rows and slot.numel() == 1:
        return False
    if k_cache.shape[0] == 1 and slot.numel() == rows:
        return True
    raise ValueError(f"qkv_rope_store: {rows} rows need a cache of {rows} rows and one slot, or "
                     f"a shared pool [1, N, ...] and {rows} slots; got a cache of "
                     f"{k_cache.shape[0]} rows and {slot.numel()} slots")


def qkv_rope_supported(qkv: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether `qkv_rope_store` runs its Triton kernel for these operands."""
    return (triton_mode(qkv.device) is not None and qkv.dim() == 2 and k_cache.dim() == 4
            and qkv.dtype in _DTYPES and k_cache.dtype == qkv.dtype
            and qkv.device == k_cache.device and qkv.stride(-1) == 1
            and k_cache.stride(-1) == 1 and 0 < k_cache.shape[3] <= MAX_HEAD_DIM
            and k_cache.shape[3] % 2 == 0 and k_cache.shape[0] in (1, qkv.shape[0]))


def qkv_rope_store(qkv: torch.Tensor, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None,
                   eps: float, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, slot: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Queries `[B, H, E]` of one decode token per row; its key and value written to the caches.

    Args:
        qkv: `[B, W]` the fused projection's output: H query heads, then G key heads, then G
            value heads, E channels each.
        q_norm, k_norm: Per-head RMSNorm weights `[E]` (Qwen3's qk-norm), or both None.
        eps: The norms' epsilon.
        cos, sin: Rotary tables `[B, E]` (halves layout) of each row's position.
        k_cache, v_cache: `[B, C, G, E]`, every row written at slot `slot[0]`; or a shared
            pool `[1, N, G, E]` (a paged cache's arena), row b's entries written at `slot[b]`
            (any batch, slot and head strides; last dim contiguous).
        slot: `[1]`, or `[B]` with a shared pool; int64 on the device.
        num_heads: H.

    Raises:
        ValueError: `slot` fits neither layout.

    Returns:
        `[B, H, E]` contiguous, in qkv's dtype.
    """
    shared = _shared_pool(qkv.shape[0], k_cache, slot)
    mode = triton_mode(qkv.device)
    if (mode is None or not qkv_rope_supported(qkv, k_cache) or not slot.is_contiguous()
            or v_cache.shape != k_cache.shape
            or v_cache.dtype != k_cache.dtype or v_cache.stride(-1) != 1
            or cos.dtype != qkv.dtype or sin.dtype != qkv.dtype
            or cos.stride(-1) != 1 or sin.stride() != cos.stride()
            or (q_norm is None) != (k_norm is None)
            or any(w is not None and (w.dtype != qkv.dtype or w.stride(0) != 1)
                   for w in (q_norm, k_norm))):
        return qkv_rope_store_reference(qkv, q_norm, k_norm, eps, cos, sin, k_cache, v_cache,
                                        slot, num_heads)
    return _launch(qkv, q_norm, k_norm, eps, cos, sin, k_cache, v_cache, slot, num_heads, mode,
                   shared)


def _launch(qkv: torch.Tensor, q_norm: torch.Tensor | None, k_norm: torch.Tensor | None,
            eps: float, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
            v_cache: torch.Tensor, slot: torch.Tensor, num_heads: int,
            mode: Mode, shared: bool) -> torch.Tensor:
    from moe_core.kernels.qkv_rope_triton import kernels

    (kernel,) = kernels(mode)
    b, g, e = qkv.shape[0], k_cache.shape[2], k_cache.shape[3]
    q = torch.empty(b, num_heads, e, dtype=qkv.dtype, device=qkv.device)  # [B, H, E]
    norm = q_norm is not None
    with device_guard(qkv.device):
        kernel[(b, num_heads + 2 * g)](
            qkv, q_norm if norm else qkv, k_norm if norm else qkv, cos, sin, q, k_cache, v_cache,
            slot, num_heads, g, e // 2, float(eps),
            qkv.stride(0), cos.stride(0), 1 if shared else 0,
            0 if shared else k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            0 if shared else v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            BLOCK_H=next_power_of_2(e // 2), NORM=norm, num_warps=1)
    return q
