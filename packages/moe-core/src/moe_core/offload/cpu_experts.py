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

Both write `out` (float32) and are exact reference-MLP equivalents within bf16 rounding.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from moe_core.offload.layout import ExpertLayout

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
    """Each expert as three torch products in the store's dtype (oneDNN / AMX on the CPU)."""

    name = "torch"

    def __call__(self, blocks: torch.Tensor, layout: ExpertLayout, hidden: torch.Tensor,
                 ids: torch.Tensor, weights: torch.Tensor, on_cpu: torch.Tensor,
                 out: torch.Tensor) -> None:
        out.zero_()
        x = hidden.to(layout.dtype)
        for e in on_cpu.nonzero().view(-1).tolist():
            rows, slots = (ids == e).nonzero(as_tuple=True)  # [N] tokens and their k
            gate, up, down = layout.views(blocks[e])
            h = x[rows]  # [N, D]
            y = F.linear(F.silu(F.linear(h, gate)) * F.linear(h, up), down)  # [N, D]
            out.index_add_(0, rows, y.float() * weights[rows, slots, None])


class NumbaCpuExperts:
    """The layer's CPU experts as one numba-compiled call, two parallel loops over weight rows,
    run without the GIL.

    Supports bf16 and fp32 stores (bf16 is widened in registers: its bits are the high half of
    an fp32). Compiled on first use (seconds); `warm_up` does it ahead of time.
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
        raw = blocks.view(torch.int16).numpy().view(np.uint16) if layout.dtype == torch.bfloat16 \
            else blocks.numpy()
        layer(raw, on_cpu.numpy(), ids.numpy(), weights.numpy(), hidden.numpy(), out.numpy(),
              layout.hidden_size, layout.intermediate_size)

    def _compiled(self, dtype: torch.dtype) -> Callable[..., None]:
        kernel = self._kernels.get(dtype)
        if kernel is None:
            if dtype not in (torch.bfloat16, torch.float32):
                raise ValueError(f"the numba CPU kernel supports bf16 and fp32 stores, not {dtype}")
            kernel = self._kernels[dtype] = _build_numba(dtype == torch.bfloat16)
        return kernel


@cache
def _build_numba(bf16: bool) -> Callable[..., None]:
    """The layer kernel for a bf16 (`uint16` bits) or an fp32 store (compiled once per process,
    on its first call)."""
    import numba
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def _bits_to_f32(typingctx: Any, bits: Any) -> Any:
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            return builder.bitcast(args[0], ir.FloatType())
        return types.float32(types.uint32), codegen

    if bf16:
        @numba.njit(inline="always")
        def widen(v: Any) -> Any:
            return _bits_to_f32(np.uint32(v) << np.uint32(16))  # type: ignore[call-arg]
    else:
        @numba.njit(inline="always")
        def widen(v: Any) -> Any:
            return v

    @numba.njit(parallel=True, nogil=True, fastmath=True)
    def layer(raw: Any, on_cpu: Any, ids: Any, weights: Any, x: Any, out: Any, d: int,
              i: int) -> None:
        num_tokens, top_k = ids.shape
        # The assignments of the chosen experts, grouped by expert (serial, tiny).
        slot_of = np.full(on_cpu.size, -1, dtype=np.int64)
        experts = np.empty(on_cpu.size, dtype=np.int64)
        n = 0
        for e in range(on_cpu.size):
            if on_cpu[e]:
                slot_of[e] = n
                experts[n] = e
                n += 1
        ends = np.zeros(n + 1, dtype=np.int64)
        for t in range(num_tokens):
            for k in range(top_k):
                j = slot_of[ids[t, k]]
                if j >= 0:
                    ends[j + 1] += 1
        for j in range(n):
            ends[j + 1] += ends[j]
        fill = ends[:n].copy()
        tokens = np.empty(ends[n], dtype=np.int64)
        scale = np.empty(ends[n], dtype=np.float32)
        for t in range(num_tokens):
            for k in range(top_k):
                j = slot_of[ids[t, k]]
                if j >= 0:
                    tokens[fill[j]] = t
                    scale[fill[j]] = weights[t, k]
                    fill[j] += 1
        act = np.empty((ends[n], i), dtype=np.float32)  # [P, I]
        for job in numba.prange(n * i):  # gate and up: one weight row of one expert per job
            j = job // i
            r = job - j * i
            block = raw[experts[j]]
            gate_row = block[r * d : (r + 1) * d]
            up_row = block[(i + r) * d : (i + r + 1) * d]
            for p in range(ends[j], ends[j + 1]):
                xt = x[tokens[p]]
                g = np.float32(0.0)
                for c in range(d):
                    g += widen(gate_row[c]) * xt[c]
                u = np.float32(0.0)
                for c in range(d):
                    u += widen(up_row[c]) * xt[c]
                act[p, r] = g / (np.float32(1.0) + np.exp(-g)) * u
        y = np.empty((ends[n], d), dtype=np.float32)  # [P, D]
        for job in numba.prange(n * d):  # down: one weight row of one expert per job
            j = job // d
            r = job - j * d
            down_row = raw[experts[j]][2 * i * d + r * i : 2 * i * d + (r + 1) * i]
            for p in range(ends[j], ends[j + 1]):
                ap = act[p]
                acc = np.float32(0.0)
                for c in range(i):
                    acc += widen(down_row[c]) * ap[c]
                y[p, r] = acc * scale[p]
        out[:] = 0.0
        for p in range(ends[n]):
            out[tokens[p]] += y[p]

    return layer


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
