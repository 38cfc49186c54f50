"""Gathering rows of a pinned host tensor straight into device memory: the GPU reads them itself.

Dimension key: N host rows, n gathered rows, ... the per-row shape.

Why: a paged KV cache in host memory is gathered row by row (one token slot each), scattered
over its pages. Gathering on the host first (an index_select into pinned staging, then one
`cudaMemcpyAsync`) reads and writes every byte in host memory before the copy engine reads it
again, on one host thread: at moe-gen's batch 512 that is 15 GB a step, and on the H200's host
the gathering thread, not the link, set the step (docs/benchmarks.md, seventh session). A kernel
that reads the rows from host memory through their host addresses (unified virtual addressing,
as `mapped_fetch` reads experts) touches each byte once, needs no staging and no host thread,
and is launched on a stream like any kernel, so the host never waits for it.

The kernel copies 16-byte words, a few blocks of threads each walking a grid-stride loop with 8
loads in flight (host reads are bound by the link's latency, not by the SMs): `blocks` sets how
many SMs' worth of threads it takes from the work beside it.

On the CPU (CI) the gather is `index_select` (host and device are the same memory).
"""

from __future__ import annotations

import torch

from moe_core.offload.cupy_launch import CupyLauncher, host_pointers_unsupported

__all__ = ["DEFAULT_GATHER_BLOCKS", "MappedRowGather", "mapped_rows_unsupported"]

_KERNEL = r"""
extern "C" __global__ void gather_rows(const uint4* __restrict__ host,
                                       uint4* __restrict__ out,
                                       const long long* __restrict__ slots,
                                       long long total, long long n16) {
    // Word i of the output is word i % n16 of host row slots[i / n16].
    const long long step = (long long)gridDim.x * blockDim.x;
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    for (; i + 7 * step < total; i += 8 * step) {
        uint4 r[8];
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            const long long w = i + k * step;
            r[k] = host[slots[w / n16] * n16 + w % n16];
        }
#pragma unroll
        for (int k = 0; k < 8; ++k) out[i + k * step] = r[k];
    }
    for (; i < total; i += step) out[i] = host[slots[i / n16] * n16 + i % n16];
}
"""
_THREADS = 256
# Blocks of 256 threads; enough loads in flight to fill the link (measured by
# benchmarks/mapped_kv_gather.py), few enough to leave the SMs to the products beside it.
DEFAULT_GATHER_BLOCKS = 64


def mapped_rows_unsupported(host: torch.Tensor, device: torch.device) -> str | None:
    """Why rows of `host` cannot be gathered by `device` reading them itself, or None."""
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"no mapped gather for device type {device.type}"
    if not host.is_pinned():
        return "the host tensor is not pinned (pageable memory is not addressable by the GPU)"
    if not host.is_contiguous():
        return "the host tensor is not contiguous"
    if host.data_ptr() % 16 or (host[0].numel() * host.element_size()) % 16:
        return "host rows are not 16-byte aligned"
    return host_pointers_unsupported(device)


class MappedRowGather:
    """`out[j] = host[slots[j]]`, with `host` in pinned host memory and `out` on the device.

    Attributes:
        device: Where the output lives and the kernel runs.
        blocks: Thread blocks of the kernel (CUDA).
    """

    def __init__(self, device: torch.device, blocks: int = DEFAULT_GATHER_BLOCKS) -> None:
        """Raises:
            ValueError: `blocks` < 1.
            ImportError: CUDA `device` without CuPy.
        """
        if blocks < 1:
            raise ValueError(f"blocks must be at least 1, got {blocks}")
        self.device = device
        self.blocks = blocks
        self._launch = (CupyLauncher(device, _KERNEL, "gather_rows")
                        if device.type == "cuda" else None)

    def __call__(self, host: torch.Tensor, slots: torch.Tensor, out: torch.Tensor) -> None:
        """Gather on torch's current stream (CUDA: asynchronous, like any kernel).

        Args:
            host: `[N, ...]` rows (pinned and contiguous on CUDA runs).
            slots: `[n]` int64 row indices, on the device; each must be in `[0, N)` (not checked
                on CUDA: checking would read them back).
            out: `[n, ...]` contiguous, on the device, `host`'s dtype.
        """
        if out.shape[0] != slots.shape[0] or out.shape[1:] != host.shape[1:]:
            raise ValueError(f"cannot gather {tuple(slots.shape)} rows of {tuple(host.shape)} "
                             f"into {tuple(out.shape)}")
        if out.dtype != host.dtype or slots.dtype != torch.long:
            raise ValueError(f"gather needs out in the host's dtype ({host.dtype}, got "
                             f"{out.dtype}) and int64 slots (got {slots.dtype})")
        if self._launch is None:
            torch.index_select(host, 0, slots.to(host.device), out=out)
            return
        if not out.is_contiguous():
            raise ValueError("the gather's output must be contiguous")
        n16 = host[0].numel() * host.element_size() // 16
        total = slots.numel() * n16
        if total == 0:
            return
        cupy = self._launch.cupy
        blocks = max(1, min(self.blocks, -(-total // (_THREADS * 8))))
        self._launch(self.device, (blocks,), (_THREADS,),
                     (cupy.uint64(host.data_ptr()), cupy.uint64(out.data_ptr()),
                      cupy.uint64(slots.data_ptr()), cupy.int64(total), cupy.int64(n16)))
