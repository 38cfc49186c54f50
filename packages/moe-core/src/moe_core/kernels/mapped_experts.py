"""A decode call's offloaded experts computed where their weights lie: in a GPU slot, in a staging
row the copy kernel filled over PCIe before the call, or in pinned host memory (read by this
kernel itself), with no gathered copy of the resident experts in between.

Dimension key: T tokens, K experts per token, D hidden, I expert width, E experts of the layer,
S slots, R staging rows, N block elements.

Why: the mapped path of the offloaded executor (`offload/mapped_fetch.py`, decision 0004) first
copies every assignment's block into a row (resident ones device to device, missing ones over
PCIe), then runs `gathered_experts` on the rows, which gathers nothing more but still writes and
reads every byte again; an FP8 block (decision 0015) is then also dequantised into a new 16-bit
copy. At batch 1 on the H200 (Qwen3-30B-A3B x 24, FP8 experts, 92% cached) that copying was the
step: 11.8 ms against a 1.3 ms bound for the bytes that must cross the link. Here two kernels
read each assignment's weights once, from wherever the call's device table says, and multiply as
they read: an FP8 weight is widened in a register and each output channel's sum scaled once.
Misses are better staged first: this kernel's own reads of host memory reached 36-39 GB/s on the
H200 against the copy kernel's 43-45 (decision 0019); the call's distinct misses get staging rows
while they last (`miss_staging`, decision 0020), the rest are read from host memory here.

The numbers are the mapped path's up to rounding: float32 accumulation (as `moe_experts`), an
unrounded float32 intermediate, and FP8 scales applied to the sum rather than to each weight
(the reference rounds every dequantised weight to the activations' dtype first).
"""

from __future__ import annotations

import dataclasses

import torch

from moe_core.kernels.backend import device_guard, next_power_of_2, num_sms, triton_mode
from moe_core.kernels.experts import experts_launch
from moe_core.offload.fp8 import FP8
from moe_core.offload.layout import ExpertLayout

__all__ = ["mapped_experts", "mapped_experts_supported"]

_HIDDEN_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_BLOCK_DTYPES = (*_HIDDEN_DTYPES, FP8)


def mapped_experts_supported(hidden: torch.Tensor, layout: ExpertLayout, pool_rows: torch.Tensor,
                             host_rows: torch.Tensor,
                             staged_rows: torch.Tensor | None = None) -> bool:
    """Whether `mapped_experts` can run here: Triton for the device (compiled on CUDA with the
    host rows in page-locked memory or on the device, or interpreted with everything on the
    CPU), supported dtypes, contiguous rows of `layout`'s blocks (staging rows on the pool's
    device)."""
    mode = triton_mode(hidden.device)
    if (mode is None or hidden.dim() != 2 or hidden.dtype not in _HIDDEN_DTYPES
            or hidden.stride(-1) != 1):
        return False
    if layout.dtype not in _BLOCK_DTYPES or (layout.is_fp8 and layout.numel % 4):
        return False
    if staged_rows is not None and staged_rows.device != pool_rows.device:
        return False
    for rows in (pool_rows, host_rows, *([] if staged_rows is None else [staged_rows])):
        if (rows.dim() != 2 or rows.shape[1] != layout.numel or rows.dtype != layout.dtype
                or not rows.is_contiguous()):
            return False
    if mode == "interpreted":
        return all(x.device.type == "cpu" for x in (hidden, pool_rows, host_rows))
    return pool_rows.device == hidden.device and (
        host_rows.device == hidden.device
        or (host_rows.device.type == "cpu" and host_rows.is_pinned()))


def mapped_experts(hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                   lut: torch.Tensor, pool_rows: torch.Tensor, host_rows: torch.Tensor,
                   layout: ExpertLayout, staged_rows: torch.Tensor | None = None) -> torch.Tensor:
    """`sum_k weights[t, k] * expert(expert_ids[t, k])(hidden[t])`, each expert's block read from
    slot `lut[e]` of `pool_rows` when it is >= 0, from row `-3 - lut[e]` of `staged_rows` when it
    is <= -3 (misses staged by `MappedFetcher.stage_misses`), from row `e` of `host_rows` when it
    is -1, and not at all when it is -2 (another lane computes it: it contributes zero).

    No host synchronisation: graph-capturable. Every assignment reads its own expert, so an
    expert repeated among the tokens is read once per assignment (from its slot, staging row or
    host row): meant for decode calls of up to a few dozen assignments' worth of tokens. Call
    only where `mapped_experts_supported`.

    Args:
        hidden: `[T, D]`.
        expert_ids: `[T, K]` expert ids of the layer.
        weights: `[T, K]` routing weights.
        lut: `[E]` integer source of each expert (slot, -1 host, -2 nobody, -3 - r staged).
        pool_rows: `[S, N]` the slot pool's blocks.
        host_rows: `[E, N]` the layer's blocks in host memory (page-locked on CUDA).
        layout: The blocks' layout (bf16/fp16/fp32, or FP8 with per-channel scales).
        staged_rows: `[R, N]` staged blocks on the pool's device; None when `lut` stages none.

    Returns:
        `[T, D]` in hidden's dtype.
    """
    from moe_core.kernels.mapped_experts_triton import kernels

    mode = triton_mode(hidden.device)
    if mode is None:
        raise RuntimeError("mapped_experts needs Triton for the device (check "
                           "mapped_experts_supported first)")
    gate_up_kernel, down_kernel = kernels(mode)
    t, k = expert_ids.shape
    d, width = layout.hidden_size, layout.intermediate_size
    cfg = experts_launch(t, k, d, width, num_sms(hidden.device))
    fp8 = layout.is_fp8
    if fp8 and mode == "compiled":  # tiles of as many bytes as 16-bit weights' tiles
        cfg = dataclasses.replace(cfg, block_d=min(2 * cfg.block_d, next_power_of_2(d)),
                                  block_red=min(2 * cfg.block_red, next_power_of_2(width)))
    if mode == "interpreted":  # programs run one after another in numpy: few, large tiles
        cfg = dataclasses.replace(
            cfg, block_i=min(next_power_of_2(width), 64), block_d=min(next_power_of_2(d), 256),
            block_out=min(next_power_of_2(d), 64), block_red=min(next_power_of_2(width), 256))
    # FP8 scales are read through float32 views of the same memory (a block's scales start at a
    # 4-aligned byte and every block is a multiple of 4 bytes); other layouts never read them.
    pool_scales = pool_rows.view(torch.float32) if fp8 else pool_rows
    host_scales = host_rows.view(torch.float32) if fp8 else host_rows
    staged = pool_rows if staged_rows is None else staged_rows  # never read without rows
    staged_scales = staged.view(torch.float32) if fp8 else staged
    scale_base = layout.scale_offset // 4 if fp8 else 0
    h = torch.empty(t * k, width, dtype=torch.float32, device=hidden.device)  # [T*K, I]
    out = torch.empty(t, d, dtype=hidden.dtype, device=hidden.device)  # [T, D]
    with device_guard(hidden.device):
        gate_up_kernel[(t * k, -(-width // cfg.block_i))](
            hidden, expert_ids, lut, pool_rows, staged, host_rows, pool_scales, staged_scales,
            host_scales, h, k, d, width, layout.numel, scale_base,
            hidden.stride(0), expert_ids.stride(0), expert_ids.stride(1),
            FP8=fp8, BLOCK_I=cfg.block_i, BLOCK_D=cfg.block_d,
            num_warps=cfg.gate_up_warps)
        down_kernel[(t, -(-d // cfg.block_out))](
            h, expert_ids, lut, weights, pool_rows, staged, host_rows, pool_scales,
            staged_scales, host_scales, out, k, d, width, layout.numel, scale_base,
            expert_ids.stride(0), expert_ids.stride(1), weights.stride(0), weights.stride(1),
            out.stride(0),
            FP8=fp8, BLOCK_K=cfg.block_k, BLOCK_OUT=cfg.block_out,
            BLOCK_I=cfg.block_red, num_warps=cfg.down_warps)
    return out
