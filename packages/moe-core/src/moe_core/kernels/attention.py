"""Single-query (decode) grouped-query attention that reads the KV cache in place, once per group.

Dimension key: B batch, H query heads, G key/value heads, R = H/G query heads per group,
S keys, E head channels, NS key splits.

Why: `attend` repeats every key and value R times for SDPA, a copy of the whole cache per layer
per step, then reads it back. Here each program attends all R heads of one group to a range of
keys, so the cache is read once per group and never copied. At decode B*G is small (4 programs
for B=1 on Qwen3-30B-A3B), so the keys are split across programs (flash-decoding) to fill the
GPU, and a small kernel combines the splits' partial results by their log-sum-exp.

Precision: scores, softmax statistics and partial outputs are float32; the probabilities enter
the value product in the cache's dtype (as flash attention does) unless that is float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_core.kernels.backend import (
    Mode,
    device_guard,
    next_power_of_2,
    num_sms,
    triton_mode,
)
from moe_core.kernels.reference import decode_attention_reference

__all__ = ["AttentionLaunch", "attention_launch", "decode_attention",
           "decode_attention_supported"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
MAX_GROUP_SIZE = 64
"""Most query heads per key/value head: one program holds them all (`[R, E]` float32 output)."""
_MAX_SPLITS = 64
"""Most key splits: the combine holds every split's partial output of one head in registers."""
_PROGRAMS_PER_SM = 1
"""Split programs per SM to aim for. Measured on the H200 (Qwen3-30B-A3B, S=1024, bf16): fewer,
longer splits with 64-key steps and 3 pipeline stages beat 2-8 programs per SM with 32-key steps
by 10-20% from B=4 up (B=64: 35 vs 42 us, 3.8 TB/s); B=1 is launch-bound (~6 us) either way."""


@dataclass(frozen=True)
class AttentionLaunch:
    """How the keys are split and tiled.

    Attributes:
        num_splits: Key ranges attended by separate programs (1: no combine kernel).
        split_len: Keys per range, a multiple of `block_s`.
        block_s: Keys per loop step.
        block_r: Query-head rows of a program (R padded to >= 16 for `tl.dot`).
        block_e: Head channels (E padded to a power of two >= 16).
    """

    num_splits: int
    split_len: int
    block_s: int
    block_r: int
    block_e: int

    def __post_init__(self) -> None:
        if self.num_splits < 1 or self.split_len % self.block_s:
            raise ValueError("AttentionLaunch.split_len must be a positive multiple of block_s")


def attention_launch(batch: int, num_groups: int, group_size: int, num_keys: int, head_dim: int,
                     sms: int) -> AttentionLaunch:
    """Key splits and tiles for B=`batch`, G=`num_groups`, R=`group_size`, S, E on `sms` SMs.

    Splits are added until B*G*NS reaches `_PROGRAMS_PER_SM` programs per SM, but a split keeps at
    least one `block_s` step of keys and there are at most `_MAX_SPLITS`. The split count depends
    on shapes only, so a captured graph replays the same grid.
    """
    block_e = max(16, next_power_of_2(head_dim))
    block_s = 64 if block_e <= 128 else 32  # [BLOCK_S, E] key and value tiles of <= 16 KiB
    steps = -(-num_keys // block_s)
    wanted = -(-_PROGRAMS_PER_SM * sms // (batch * num_groups))
    splits = max(1, min(wanted, steps, _MAX_SPLITS))
    split_len = -(-steps // splits) * block_s
    return AttentionLaunch(num_splits=-(-num_keys // split_len), split_len=split_len,
                           block_s=block_s, block_r=max(16, next_power_of_2(group_size)),
                           block_e=block_e)


def decode_attention_supported(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether `decode_attention` runs its Triton kernels for q `[B, H, E]` and k `[B, S, G, E]`
    (the operands in `decode_attention`'s own layout); False means the SDPA reference."""
    if triton_mode(q.device) is None or q.dim() != 3 or k.dim() != 4:
        return False
    b, h, e = q.shape
    return (q.dtype == k.dtype and q.dtype in _DTYPES and q.device == k.device
            and b == k.shape[0] > 0 and k.shape[1] > 0 and k.shape[2] > 0
            and h % k.shape[2] == 0 and h // k.shape[2] <= MAX_GROUP_SIZE
            and e == k.shape[3] and 0 < e <= MAX_HEAD_DIM
            and q.stride(-1) == 1 and k.stride(-1) == 1)


def _operands_fit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                  index: torch.Tensor | None) -> bool:
    """The checks on v, mask and index that `decode_attention_supported` leaves out."""
    keys = k.shape[1] if index is None else index.shape[1]
    return (v.shape == k.shape and v.dtype == k.dtype and v.device == k.device
            and v.stride(-1) == 1 and mask.shape == (q.shape[0], keys)
            and mask.is_floating_point() and mask.device == q.device
            and (index is None or (index.dtype == torch.long and index.device == q.device
                                   and index.stride(-1) == 1)))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                     scale: float, index: torch.Tensor | None = None) -> torch.Tensor:
    """`softmax(q k^T * scale + mask) v` for one query per sequence, grouped key/value heads.

    Query head h reads key/value head `h // R` (R = H/G), as `repeat_interleave(R, dim=1)` would;
    nothing is copied or repeated. Graph-capturable: no host synchronisation, and buffers sized
    by the shapes alone. The SDPA reference where Triton cannot run.

    Args:
        q: `[B, H, E]`, float16, bfloat16 or float32; last dim contiguous.
        k: `[B, S, G, E]`; any batch, key and head strides, last dim contiguous. With `index`:
            a paged pool `[1, N, G, E]` every row's keys are read from.
        v: Like k.
        mask: `[B, S]` additive (0 allowed, a large negative value elsewhere), any float dtype;
            every row must allow at least one key.
        scale: Multiplier on `q . k`.
        index: `[B, S]` int64, the pool slot of each row's keys (a paged cache's tables, read in
            place: nothing is gathered); None: key s is slot s of the row's own `k`.

    Returns:
        `[B, H, E]` in q's dtype.

    Raises:
        ValueError: `index` with keys other than one shared pool `[1, N, G, E]`.
    """
    if index is not None and (k.dim() != 4 or k.shape[0] != 1 or index.dim() != 2
                              or index.shape[0] != q.shape[0]):
        raise ValueError(f"decode_attention: an index [B, S] reads one shared pool [1, N, G, E]; "
                         f"got keys {tuple(k.shape)} and index {tuple(index.shape)}")
    pooled = k if index is None else k.expand(q.shape[0], *k.shape[1:])  # [B, N, G, E] views
    if not (decode_attention_supported(q, pooled) and _operands_fit(q, k, v, mask, index)):
        if index is not None:  # the reference on each row's keys, gathered
            k, v = k[0][index], v[0][index]  # [B, S, G, E]
        return decode_attention_reference(q, k, v, mask, scale)
    mode = triton_mode(q.device)
    assert mode is not None  # decode_attention_supported checked it
    return _launch(q, k, v, mask, scale, mode, index)


def _launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
            mode: Mode, index: torch.Tensor | None) -> torch.Tensor:
    from moe_core.kernels.attention_triton import kernels

    split_kernel, combine_kernel = kernels(mode)
    b, h, e = q.shape
    s, g = (k.shape[1] if index is None else index.shape[1]), k.shape[2]
    paged = index is not None
    cfg = attention_launch(b, g, h // g, s, e, num_sms(q.device))
    # The interpreter's bf16 tl.dot multiplies raw bits; run its products in float32 there.
    dot_f32 = q.dtype == torch.float32 or (mode == "interpreted" and q.dtype == torch.bfloat16)
    out = torch.empty(b, h, e, dtype=q.dtype, device=q.device)  # [B, H, E]
    direct = cfg.num_splits == 1
    if direct:
        lse = part = out  # unused by the DIRECT kernel
    else:
        lse = torch.empty(b, h, cfg.num_splits, dtype=torch.float32, device=q.device)
        part = torch.empty(b, h, cfg.num_splits, e, dtype=torch.float32, device=q.device)
    with device_guard(q.device):
        split_kernel[(b * g, cfg.num_splits)](
            q, k, v, mask, mask if index is None else index, lse, part, out,
            g, h // g, s, e, cfg.split_len, cfg.num_splits, float(scale),
            q.stride(0), q.stride(1), 0 if paged else k.stride(0), k.stride(1), k.stride(2),
            0 if paged else v.stride(0), v.stride(1), v.stride(2), mask.stride(0),
            mask.stride(1), 0 if index is None else index.stride(0),
            BLOCK_R=cfg.block_r, BLOCK_S=cfg.block_s, BLOCK_E=cfg.block_e, DOT_F32=dot_f32,
            PRECISION="ieee" if dot_f32 else "tf32", DIRECT=direct, PAGED=paged,
            num_warps=4 if cfg.block_e <= 128 else 8,
            num_stages=2 if q.dtype == torch.float32 else 3)  # float32 tiles: 2 fit in smem
        if not direct:
            block_ns = next_power_of_2(cfg.num_splits)
            combine_kernel[(b * h,)](
                lse, part, out, e, cfg.num_splits, BLOCK_NS=block_ns, BLOCK_E=cfg.block_e,
                num_warps=4 if block_ns * cfg.block_e <= 8192 else 8)
    return out
