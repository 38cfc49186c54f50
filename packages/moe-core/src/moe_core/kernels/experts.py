"""Routed experts for a handful of tokens, reading each chosen expert's weights once, in place.

Dimension key: T tokens, K experts per token, D hidden, I expert width, W stacked weights.

Why: `gathered_experts` copies the T*K chosen experts out of the weight stack and then runs three
batched products, so every chosen byte crosses HBM three times (read, write, read). Here two
kernels read the stack where it lies: (a) gate, up and SiLU*mul for every assignment into a
float32 `[T*K, I]` intermediate, (b) the down projection with each token's weighted sum over its
K experts. At batch 1 the layer is then one pass over the chosen weights at near HBM bandwidth.

The intermediate is float32: it is tiny next to the weights (T*K*I*4 bytes, 1.5 MiB for
Qwen3-30B-A3B at T=64 against 600 MiB of weights), and keeping it unrounded means the only
roundings left are the weights' own dtype and the final cast.
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
from moe_core.kernels.reference import moe_experts_reference

__all__ = ["ExpertsLaunch", "experts_launch", "moe_experts", "moe_experts_supported"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TILE = 1024
"""Elements of one weight tile per loop step. Measured on the H200 (Qwen3-30B-A3B at T=1 and 4,
Mixtral at T=1, bf16): 1024-element tiles with 8 warps beat 2048-8192-element ones by 15-25%,
more programs in flight with fewer registers each covering HBM latency better."""
_GATE_UP_ROWS = 8
"""Gate/up rows per program: the measured best at every target shape (2-16 tried)."""
_DOWN_OUTPUTS = 2
"""Down outputs per program (times K experts = tile rows): the measured best (2-16 tried)."""
_PROGRAMS_PER_SM = 4
"""Programs per SM below which gate/up rows shrink further (tiny T*K*I)."""


@dataclass(frozen=True)
class ExpertsLaunch:
    """Tile sizes and warps of the two expert kernels.

    Attributes:
        block_i: Gate/up rows (of I) per program.
        block_d: Hidden columns per gate/up loop step.
        block_k: Experts per down tile (K rounded up to a power of two).
        block_out: Down outputs (of D) per program.
        block_red: Columns (of I) per down loop step.
        gate_up_warps: Warps of a gate/up program.
        down_warps: Warps of a down program.
    """

    block_i: int
    block_d: int
    block_k: int
    block_out: int
    block_red: int
    gate_up_warps: int = 8
    down_warps: int = 8

    def __post_init__(self) -> None:
        for name in ("block_i", "block_d", "block_k", "block_out", "block_red",
                     "gate_up_warps", "down_warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"ExpertsLaunch.{name} must be a power of two, got {value}")


def experts_launch(tokens: int, top_k: int, hidden: int, width: int,
                   sms: int) -> ExpertsLaunch:
    """Tile sizes for T=`tokens`, K=`top_k`, D=`hidden`, I=`width` on `sms` SMs.

    Small `_TILE`-element tiles and many programs: at batch 1 the work is T*K GEMVs, and the
    grid must keep every SM streaming. Gate/up rows shrink below `_GATE_UP_ROWS` (to 2) only when
    the grid would have fewer than `_PROGRAMS_PER_SM` programs per SM.
    """
    target = _PROGRAMS_PER_SM * sms
    block_i = min(_GATE_UP_ROWS, max(2, next_power_of_2(width)))
    while block_i > 2 and tokens * top_k * -(-width // block_i) < target:
        block_i //= 2
    block_d = max(16, min(next_power_of_2(hidden), _TILE // block_i))
    block_k = next_power_of_2(top_k)
    rows = block_k * _DOWN_OUTPUTS
    block_red = max(16, min(next_power_of_2(width), 128, _TILE // rows))
    return ExpertsLaunch(block_i, block_d, block_k, _DOWN_OUTPUTS, block_red,
                         gate_up_warps=8 if block_i * block_d >= _TILE else 4,
                         down_warps=8 if rows * block_red >= _TILE else 4)


def moe_experts_supported(hidden: torch.Tensor, gate: torch.Tensor) -> bool:
    """Whether `moe_experts` runs its Triton kernels for this hidden state and gate stack.

    False means it falls back to `gathered_experts` (callers may prefer another path then):
    no Triton for the device, an unsupported dtype, or a layout the kernels cannot address.
    """
    return (triton_mode(hidden.device) is not None
            and hidden.dim() == 2 and gate.dim() == 3
            and hidden.dtype in _DTYPES and gate.dtype in _DTYPES
            and hidden.device == gate.device
            and hidden.shape[0] > 0 and gate.shape[1] > 0
            and gate.shape[2] == hidden.shape[1] > 0
            and hidden.stride(-1) == 1 and gate.stride(-1) == 1)


def _operands_fit(hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
                  gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> bool:
    """The checks `moe_experts_supported` cannot make from its two arguments."""
    i, d = gate.shape[1], gate.shape[2]
    return (up.dim() == 3 and down.dim() == 3
            and up.shape[1:] == (i, d) and down.shape[1:] == (d, i)
            and up.dtype == gate.dtype == down.dtype
            and up.stride(-1) == 1 and down.stride(-1) == 1
            and index.dim() == 2 and index.shape == weights.shape
            and index.shape[0] == hidden.shape[0] and index.shape[1] > 0
            and not index.is_floating_point() and weights.is_floating_point()
            and all(x.device == hidden.device for x in (index, weights, up, down)))


def moe_experts(hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
                gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """`sum_k weights[t, k] * expert(index[t, k])(hidden[t])` for gated SiLU experts.

    The semantics of `gathered_experts(hidden, index, ...)`, computed with float32 accumulation
    straight from the weight stacks; the torch reference where Triton cannot run. Graph-capturable:
    no host synchronisation, one `[T*K, I]` float32 scratch.

    Args:
        hidden: `[T, D]`, float16, bfloat16 or float32.
        index: `[T, K]` integer rows of the weight stacks (expert or slot ids).
        weights: `[T, K]` routing weights, any float dtype.
        gate: `[W, I, D]`; may be a strided view (any row stride, last dim contiguous), e.g. the
            slots of a pool or one half of a `[W, 2I, D]` view.
        up: `[W, I, D]`, same dtype.
        down: `[W, D, I]`, same dtype.

    Returns:
        `[T, D]` in hidden's dtype.
    """
    if not (moe_experts_supported(hidden, gate)
            and _operands_fit(hidden, index, weights, gate, up, down)):
        return moe_experts_reference(hidden, index, weights, gate, up, down)
    mode = triton_mode(hidden.device)
    assert mode is not None  # moe_experts_supported checked it
    return _launch(hidden, index, weights, gate, up, down, mode)


def _launch(hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
            gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, mode: Mode) -> torch.Tensor:
    from moe_core.kernels.experts_triton import kernels

    gate_up_kernel, down_kernel = kernels(mode)
    t, k = index.shape
    width, d = gate.shape[1], gate.shape[2]
    cfg = experts_launch(t, k, d, width, num_sms(hidden.device))
    h = torch.empty(t * k, width, dtype=torch.float32, device=hidden.device)  # [T*K, I]
    out = torch.empty(t, d, dtype=hidden.dtype, device=hidden.device)  # [T, D]
    with device_guard(hidden.device):
        gate_up_kernel[(t * k, -(-width // cfg.block_i))](
            hidden, index, gate, up, h, k, d, width,
            hidden.stride(0), index.stride(0), index.stride(1),
            gate.stride(0), gate.stride(1), up.stride(0), up.stride(1),
            BLOCK_I=cfg.block_i, BLOCK_D=cfg.block_d, num_warps=cfg.gate_up_warps)
        down_kernel[(t, -(-d // cfg.block_out))](
            h, index, weights, down, out, k, d, width,
            index.stride(0), index.stride(1), weights.stride(0), weights.stride(1),
            down.stride(0), down.stride(1), out.stride(0),
            BLOCK_K=cfg.block_k, BLOCK_OUT=cfg.block_out, BLOCK_I=cfg.block_red,
            num_warps=cfg.down_warps)
    return out
