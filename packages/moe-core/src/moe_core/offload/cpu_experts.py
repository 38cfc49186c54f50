"""Routed experts computed on the CPU, straight from the host store: the CPU lane of decode.

Dimension key: T tokens, K experts per token, D hidden, I expert width, E experts of the layer,
n experts computed here, P their token assignments.

Why: at batch 1 a missed expert is one token's product with ~9.4 MB of weights (Qwen3-30B-A3B).
Fetching it costs its bytes over PCIe (~55 GB/s); computing it on the host costs the same bytes
read from host memory by the cores (the issue's target: >= 60 GB/s on 16 cores), so a layer
whose misses are split between the two lanes finishes in about half the time of either
(DESIGN.md, "computing cold experts on the CPU beats fetching them").

A kernel computes every expert of one layer call that the split gave to the CPU, in one call:

    out[t] = sum over (t, k) with ids[t, k] in experts of weights[t, k] * expert_ids[t,k](h[t])

Two implementations, chosen by measurement (`choose_cpu_kernel`, decision 0009):

- `TorchCpuExperts`: per expert, torch's own CPU products over the bf16 store (oneDNN; AMX where
  the CPU has it), threads from torch's pool. Torch releases the GIL inside each operator.
- `NumbaCpuExperts`: one numba-compiled parallel loop per projection over every (expert, row)
  pair of the call, bf16 widened to fp32 in registers; compiled with `nogil=True`, so the
  whole call runs without the GIL. One fork-join per projection instead of ~5 per expert.
  FP8 blocks are read as they are stored, e4m3 bytes decoded in registers and each row scaled
  once (`numba_experts`): half the bytes of bf16, which is what the lane waits on.

Both write `out` (float32) and are exact reference-MLP equivalents within bf16 rounding (FP8: of
the MLP over the dequantised weights, within float32 rounding; the torch kernel dequantises one
expert at a time to float32, a fallback).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from moe_core.offload.fp8 import FP8
from moe_core.offload.layout import ExpertLayout
from moe_core.offload.numba_experts import build_fp8_kernel, build_kernel

__all__ = ["CpuExpertKernel", "KernelTiming", "NumbaCpuExperts", "TorchCpuExperts",
           "choose_cpu_kernel", "cpu_kernels", "time_cpu_kernel"]


class CpuExpertKernel(Protocol):
    """Computes one layer call's CPU-lane experts (see the module docstring)."""

    name: str

    def __call__(self, blocks: torch.Tensor, layout: ExpertLayout, hidden: torch.Tensor,
                 ids: torch.Tensor, weights: torch.Tensor, on_cpu: torch.Tensor,
                 out: torch.Tensor) -> None:
        """Args:
            blocks: `[E, numel]` the layer's expert blocks in host memory (the store's arena).
            layout: Where gate, up and down sit in a block.
            hidden: `[T, D]` float32, the layer's input rows.
            ids: `[T, K]` int64 expert ids.
            weights: `[T, K]` float32 routing weights.
            on_cpu: `[E]` bool, the experts to compute here.
            out: `[T, D]` float32, overwritten with their weighted sum (zero rows where none).
        """
        ...


class TorchCpuExperts:
    """Each expert as three torch products in the store's dtype (oneDNN / AMX on the CPU); FP8
    experts dequantised to float32 one at a time first."""

    name = "torch"

    def __call__(self, blocks: torch.Tensor, layout: ExpertLayout, hidden: torch.Tensor,
                 ids: torch.Tensor, weights: torch.Tensor, on_cpu: torch.Tensor,
                 out: torch.Tensor) -> None:
        out.zero_()
        compute = torch.float32 if layout.is_fp8 else layout.dtype
        x = hidden.to(compute)
        for e in on_cpu.nonzero().view(-1).tolist():
            rows, slots = (ids == e).nonzero(as_tuple=True)  # [N] tokens and their k
            gate, up, down = layout.matrices(blocks[e], compute)
            h = x[rows]  # [N, D]
            y = F.linear(F.silu(F.linear(h, gate)) * F.linear(h, up), down)  # [N, D]
            out.index_add_(0, rows, y.float() * weights[rows, slots, None])


class NumbaCpuExperts:
    """The layer's CPU experts as one numba-compiled call, two parallel loops over weight rows,
    run without the GIL.

    Supports bf16, fp32 and FP8 stores (bf16 is widened in registers: its bits are the high half
    of an fp32; e4m3 is decoded in registers, see `numba_experts`). Compiled on first use
    (seconds); `warm_up` does it ahead of time.
    """

    name = "numba"

    def __init__(self) -> None:
        self._kernels: dict[torch.dtype, Callable[..., None]] = {}

    def warm_up(self, layout: ExpertLayout) -> None:
        """Compile for `layout`'s dtype now (otherwise the first call does)."""
        self._compiled(layout.dtype)

    def __call__(self, blocks: torch.Tensor, layout: ExpertLayout, hidden: torch.Tensor,
                 ids: torch.Tensor, weights: torch.Tensor, on_cpu: torch.Tensor,
                 out: torch.Tensor) -> None:
        layer = self._compiled(layout.dtype)
        d, i = layout.hidden_size, layout.intermediate_size
        routing = (on_cpu.numpy(), ids.numpy(), weights.numpy(), hidden.numpy(), out.numpy())
        if layout.is_fp8:  # the bytes, and each block's scales viewed in place (no copy)
            raw = blocks.view(torch.int8).numpy()  # [E, N] (signed: see `numba_experts`)
            layer(raw, raw[:, layout.scale_offset :].view(np.float32), *routing, d, i)
            return
        raw = blocks.view(torch.int16).numpy().view(np.uint16) if layout.dtype == torch.bfloat16 \
            else blocks.numpy()
        layer(raw, *routing, d, i)

    def _compiled(self, dtype: torch.dtype) -> Callable[..., None]:
        kernel = self._kernels.get(dtype)
        if kernel is None:
            if dtype == FP8:
                kernel = build_fp8_kernel()
            elif dtype in (torch.bfloat16, torch.float32):
                kernel = build_kernel(dtype == torch.bfloat16)
            else:
                raise ValueError(f"the numba CPU kernel supports bf16, fp32 and FP8 stores, not "
                                 f"{dtype}")
            self._kernels[dtype] = kernel
        return kernel


def cpu_kernels() -> list[CpuExpertKernel]:
    """Every CPU expert kernel this installation can run (numba's where it imports)."""
    kernels: list[CpuExpertKernel] = [TorchCpuExperts()]
    try:
        import numba  # noqa: F401
    except ImportError:
        return kernels
    kernels.append(NumbaCpuExperts())
    return kernels


class KernelTiming:
    """One kernel's measured time for a call of `experts` experts at `tokens` tokens each.

    Attributes:
        name: The kernel.
        seconds: Median seconds per call.
        gb_per_s: Expert bytes read per second (each expert's block once per call).
    """

    def __init__(self, name: str, seconds: float, nbytes: int) -> None:
        self.name = name
        self.seconds = seconds
        self.gb_per_s = nbytes / seconds / 1e9 if seconds > 0 else float("inf")

    def __repr__(self) -> str:
        return f"KernelTiming({self.name}: {self.seconds * 1e3:.3f} ms, {self.gb_per_s:.1f} GB/s)"


def time_cpu_kernel(kernel: CpuExpertKernel, blocks: torch.Tensor, layout: ExpertLayout,
                    experts: int = 4, tokens: int = 1, repeats: int = 5) -> KernelTiming:
    """Median time of `kernel` on `experts` distinct experts of `blocks`, `tokens` tokens each
    (one warm-up call first, which also compiles a numba kernel). Each timed call reads experts
    the calls before it did not (as a decode step's layers do), from the far end of `blocks`
    back, so a processor cache does not serve them while `blocks` has enough of them."""
    num_experts = blocks.shape[0]
    experts = min(experts, num_experts)
    hidden = torch.randn(tokens, layout.hidden_size)
    out = torch.empty(tokens, layout.hidden_size)
    weights = torch.full((tokens, experts), 1.0 / experts)

    def call(n: int) -> float:
        first = num_experts - experts * (n % max(1, num_experts // experts) + 1)
        chosen = list(range(first, first + experts))
        ids = torch.tensor([chosen] * tokens, dtype=torch.long)  # [T, K]: every token, all
        on_cpu = torch.zeros(num_experts, dtype=torch.bool)
        on_cpu[chosen] = True
        start = time.perf_counter()
        kernel(blocks, layout, hidden, ids, weights, on_cpu, out)
        return time.perf_counter() - start

    call(repeats)  # warm-up (compiles), on experts the first timed calls do not read
    times = [call(n) for n in range(repeats)]
    return KernelTiming(kernel.name, float(np.median(times)), experts * layout.nbytes)


def choose_cpu_kernel(blocks: torch.Tensor, layout: ExpertLayout,
                      candidates: Sequence[CpuExpertKernel] | None = None,
                      experts: int = 4) -> tuple[CpuExpertKernel, list[KernelTiming]]:
    """The fastest of `candidates` (default `cpu_kernels()`) at one token per expert, measured
    on `blocks` (a layer's arena), and every timing taken."""
    pool = list(candidates) if candidates is not None else cpu_kernels()
    timings = [time_cpu_kernel(k, blocks, layout, experts) for k in pool]
    best = min(range(len(pool)), key=lambda n: timings[n].seconds)
    return pool[best], timings
