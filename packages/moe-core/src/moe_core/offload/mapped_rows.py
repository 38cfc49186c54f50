"""Gathering rows of a pinned host tensor straight into device memory, and scattering device rows
back into it: the GPU reads and writes host memory itself.

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

The way back (`scatter`: a step's new KV rows into their slots) is the same kernel reversed: the
GPU writes the rows into host memory over the link's other direction, with no copy to a host
buffer, no host-side index_copy and no wait for the device on the host.

On the CPU (CI) the gather is `index_select` and the scatter `index_copy_` (host and device are
the same memory).
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

extern "C" __global__ void scatter_rows(uint4* __restrict__ host,
                                        const uint4* __restrict__ rows,
                                        const long long* __restrict__ slots,
                                        long long total, long long n16) {
    // Word i of the rows is word i % n16 of host row slots[i / n16].
    const long long step = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += step)
        host[slots[i / n16] * n16 + i % n16] = rows[i];
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
    """`out[j] = host[slots[j]]` (and back: `host[slots[j]] = rows[j]`), with `host` in pinned
    host memory and `out` on the device.

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
        cuda = device.type == "cuda"
        self._launch = CupyLauncher(device, _KERNEL, "gather_rows") if cuda else None
        self._launch_scatter = CupyLauncher(device, _KERNEL, "scatter_rows") if cuda else None

    def __call__(self, host: torch.Tensor, slots: torch.Tensor, out: torch.Tensor) -> None:
        """Gather on torch's current stream (CUDA: asynchronous, like any kernel).

        Args:
            host: `[N, ...]` rows (pinned and contiguous on CUDA runs).
            slots: `[n]` int64 row indices, on the device; each must be in `[0, N)` (not checked
                on CUDA: checking would read them back).
            out: `[n, ...]` contiguous, on the device, `host`'s dtype.
        """
        self._check(host, slots, out)
        if self._launch is None:
            torch.index_select(host, 0, slots.to(host.device), out=out)
            return
        self._run(self._launch, host, slots, out, 8)

    def scatter(self, host: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
        """`host[slots[j]] = rows[j]` on torch's current stream (CUDA: asynchronous; the host
        sees the rows once the stream has run past it).

        Args:
            host: `[N, ...]` rows (pinned and contiguous on CUDA runs).
            slots: `[n]` int64 distinct row indices in `[0, N)`, on the device.
            rows: `[n, ...]` contiguous, on the device, `host`'s dtype.
        """
        self._check(host, slots, rows)
        if self._launch_scatter is None:
            host.index_copy_(0, slots.to(host.device), rows)
            return
        self._run(self._launch_scatter, host, slots, rows, 1)

    def _run(self, launch: CupyLauncher, host: torch.Tensor, slots: torch.Tensor,
             rows: torch.Tensor, words_per_thread: int) -> None:
        """Launch `launch` over the 16-byte words of `slots`' rows, with enough blocks (at most
        `blocks`) for each thread to move `words_per_thread` of them."""
        n16 = host[0].numel() * host.element_size() // 16
        total = slots.numel() * n16
        if total == 0:
            return
        cupy = launch.cupy
        blocks = max(1, min(self.blocks, -(-total // (_THREADS * words_per_thread))))
        launch(self.device, (blocks,), (_THREADS,),
               (cupy.uint64(host.data_ptr()), cupy.uint64(rows.data_ptr()),
                cupy.uint64(slots.data_ptr()), cupy.int64(total), cupy.int64(n16)))

    @staticmethod
    def _check(host: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
        if rows.shape[0] != slots.shape[0] or rows.shape[1:] != host.shape[1:]:
            raise ValueError(f"cannot move {tuple(slots.shape)} rows between {tuple(host.shape)} "
                             f"and {tuple(rows.shape)}")
        if rows.dtype != host.dtype or slots.dtype != torch.long:
            raise ValueError(f"rows must be in the host's dtype ({host.dtype}, got "
                             f"{rows.dtype}) and slots int64 (got {slots.dtype})")
        if rows.device.type == "cuda" and not rows.is_contiguous():
            raise ValueError("the device rows must be contiguous")
