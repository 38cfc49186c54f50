"""Fetching a layer's routed experts without the host: the GPU reads missed experts straight from
mapped pinned host memory, in a kernel whose sources are chosen on the device.

Dimension key: T tokens, K experts per token, J = T*K assignments, E experts per layer,
N block elements.

Why: the copy path needs the routing on the host to pick slots and submit copies, one host
synchronisation per layer. At batch 1 that puts the host in the critical path of every layer:
on the H200 a Qwen3-30B-A3B layer spent 2.8 ms on the host against a 1.45 ms copy (decision
0004). Page-locked host memory is addressable by the GPU (unified virtual addressing), so a
kernel can read an expert's block over PCIe itself: measured at 45-49.5 GB/s for 9.4 MB blocks
on the H200, 0.89-0.93 x `cudaMemcpyAsync` of the same blocks. The whole decode step is then
enqueued without a single synchronisation and the host runs ahead of the GPU.

`fetch_rows` returns one row per assignment: a resident expert is copied from its slot (device
to device), a missing one from the host store, each distinct expert once (duplicates point at
the first occurrence through `index`; one token's experts are distinct and need no index). The
rows feed `gathered_experts`. An expert marked -2 (computed by the CPU lane, `two_lanes`) gets a
zero row, read from nowhere. `fetch_blocks` reads a list of distinct experts instead, one row
each, skipping padding entries (the grouped path of calls above the gather limit,
`grouped_mapped`). `stage_misses` copies only the blocks that must cross the link, one row per
distinct missed expert while its rows last (`kernels.miss_staging`), for a product kernel that
reads resident experts in their slots (`kernels.mapped_experts`). The kernel copies bytes: FP8
blocks (decision 0015) travel as they are stored, weights and scales, and are dequantised after
the gather.

Two implementations with the same result: a CuPy kernel on CUDA (`_CudaRowCopier`), torch
indexing on the CPU (for CI, where "host" and "device" are the same memory).
"""

from __future__ import annotations

import torch

from moe_core.offload.cupy_launch import CupyLauncher, host_pointers_unsupported
from moe_core.offload.gpu_slots import GpuSlotPool
from moe_core.offload.host_store import HostExpertStore

__all__ = ["MappedFetcher", "mapped_fetch_unsupported"]

_KERNEL = r"""
extern "C" __global__ void fetch_rows(const uint4* __restrict__ host,
                                      const uint4* __restrict__ pool,
                                      uint4* __restrict__ rows,
                                      const long long* __restrict__ ids,
                                      const long long* __restrict__ lut,
                                      const long long* __restrict__ first,
                                      long long n16, int misses_only) {
    const long long j = blockIdx.y;
    if (first != nullptr && first[j] != j) return;   // a duplicate: the first copy serves it
    const long long e = ids[j];
    if (e < 0) return;   // an empty row (stage_misses)
    const long long slot = lut[e];
    if (misses_only && slot != -1) return;   // only the blocks that must cross the link
    uint4* dst = rows + j * n16;
    if (slot == -2) {   // computed by the CPU lane: a zero row contributes nothing
        const long long chunk = (n16 + gridDim.x - 1) / gridDim.x;
        const long long lo = blockIdx.x * chunk;
        const long long hi = lo + chunk < n16 ? lo + chunk : n16;
        for (long long i = lo + threadIdx.x; i < hi; i += blockDim.x)
            dst[i] = make_uint4(0, 0, 0, 0);
        return;
    }
    const uint4* src = slot >= 0 ? pool + slot * n16 : host + e * n16;
    // Each block copies one contiguous chunk with 8 loads in flight per thread. On the H200 it
    // matched a one-load grid-stride loop within noise (49.5 vs 49.3 and 48.0 vs 48.2 GB/s at
    // best, two leases; benchmarks/mapped_read.py): host-memory reads are bound by the link.
    const long long chunk = (n16 + gridDim.x - 1) / gridDim.x;
    const long long lo = blockIdx.x * chunk;
    const long long hi = lo + chunk < n16 ? lo + chunk : n16;
    const long long step = blockDim.x;
    long long i = lo + threadIdx.x;
    for (; i + 7 * step < hi; i += 8 * step) {
        uint4 r[8];
#pragma unroll
        for (int k = 0; k < 8; ++k) r[k] = src[i + k * step];
#pragma unroll
        for (int k = 0; k < 8; ++k) dst[i + k * step] = r[k];
    }
    for (; i < hi; i += step) dst[i] = src[i];
}
"""
_BLOCKS_PER_ROW = 16  # 16 x J blocks of 256 threads: 48-49.5 GB/s from host memory on the H200
_THREADS = 256


def mapped_fetch_unsupported(store: HostExpertStore, pool: GpuSlotPool) -> str | None:
    """Why `store` cannot be read by `pool`'s device directly, or None when it can."""
    if pool.device.type == "cpu":
        return None
    if pool.device.type != "cuda":
        return f"no mapped fetch for device type {pool.device.type}"
    if not store.is_pinned:
        return "the host store is not pinned (pageable memory is not addressable by the GPU)"
    if store.layout.nbytes % 16:
        return f"expert blocks of {store.layout.nbytes} bytes are not a multiple of 16"
    if any(store.arena(layer).data_ptr() % 16 for layer in store.moe_layers):
        return "a host arena is not 16-byte aligned"
    if pool.storage.data_ptr() % 16:
        return "the slot pool is not 16-byte aligned"
    return host_pointers_unsupported(pool.device)


class MappedFetcher:
    """Builds the per-assignment expert rows of one layer call, sources chosen on the device.

    Attributes:
        store: Host tier (its arenas are read by the GPU).
        pool: The device slots (resident experts are copied from there).
    """

    def __init__(self, store: HostExpertStore, pool: GpuSlotPool) -> None:
        """Raises:
            RuntimeError: the store cannot be read from `pool`'s device (see
                `mapped_fetch_unsupported`).
        """
        reason = mapped_fetch_unsupported(store, pool)
        if reason is not None:
            raise RuntimeError(f"mapped fetch unavailable: {reason}")
        self.store = store
        self.pool = pool
        self._copier = _CudaRowCopier(pool.device) if pool.device.type == "cuda" else None

    def fetch_rows(self, layer: int, ids: torch.Tensor, lut: torch.Tensor,
                   distinct: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The expert rows of one layer call, without reading anything on the host.

        Args:
            layer: Decoder-layer index.
            ids: `[J]` expert ids of the assignments (device).
            lut: `[E]` slot of each expert of `layer`, -1 where it is not resident and ready,
                -2 where another lane computes it (its row is zeros: `two_lanes`).
            distinct: The ids are known to be distinct (one token's top-k): every row is its
                own assignment's, and no de-duplication runs.

        Returns:
            `(rows, index)`: `rows` `[J, N]` expert blocks (a row is written only for the first
            assignment of each distinct expert), `index` `[J]` the row each assignment reads,
            None when `distinct` (row `j` is assignment `j`'s).
        """
        ids = ids.to(torch.long)  # the kernel reads 64-bit ids
        j = ids.numel()
        index = None
        if not distinct:  # first occurrence of each id (argmax returns the first maximum)
            index = (ids[:, None] == ids[None, :]).to(torch.uint8).argmax(dim=1)  # [J]
        rows = torch.empty(j, self.store.layout.numel, dtype=self.store.layout.dtype,
                           device=ids.device)  # [J, N]
        if self._copier is not None:
            self._copier.copy(self.store.arena(layer), self.pool.storage, rows, ids, lut, index)
        else:
            slots = lut[ids]  # [J]
            host = self.store.arena(layer).view(self.store.num_experts, -1)[ids]  # [J, N]
            pool = self.pool.storage.view(self.pool.num_slots, -1)[slots.clamp(min=0)]
            rows.copy_(torch.where((slots >= 0)[:, None], pool, host))
            rows.view(torch.uint8)[slots == -2] = 0  # zero bytes (FP8 has no masked fill)
        return rows, index

    def stage_misses(self, layer: int, ids: torch.Tensor, lut: torch.Tensor,
                     rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy the call's distinct missed experts over the link into at most `rows` staging
        rows, without reading anything on the host; misses beyond them stay in host memory.

        Args:
            layer: Decoder-layer index.
            ids: `[J]` expert ids of the call's assignments (device).
            lut: `[E]` int64 slot of each expert of `layer`, -1 where it is not resident and
                ready, -2 where another lane computes it.
            rows: R, staging rows (>= 1).

        Returns:
            `(call_lut, staged)`: `call_lut` `[E]` is `lut` with each staged expert's entry
            rewritten to `-3 - r` (`kernels.miss_staging`); `staged` `[R, N]` holds row r's
            block (rows left empty are unwritten).
        """
        from moe_core.kernels.miss_staging import miss_staging_plan

        call_lut, row_experts = miss_staging_plan(ids, lut, rows)  # [E], [R]
        staged = torch.empty(rows, self.store.layout.numel, dtype=self.store.layout.dtype,
                             device=lut.device)  # [R, N]
        if self._copier is not None:  # row r reads expert row_experts[r] (-1: skipped)
            self._copier.copy(self.store.arena(layer), self.pool.storage, staged, row_experts,
                              lut, None, misses_only=True)
            return call_lut, staged
        filled = row_experts >= 0  # [R]
        staged[filled] = self.store.arena(layer).view(self.store.num_experts, -1)[
            row_experts[filled]]
        return call_lut, staged

    def fetch_blocks(self, layer: int, ids: torch.Tensor, live: torch.Tensor,
                     lut: torch.Tensor) -> torch.Tensor:
        """The blocks of distinct experts, one row each, without reading anything on the host;
        padding entries (a fixed-size call's unused places) are not read at all.

        Args:
            layer: Decoder-layer index.
            ids: `[C]` distinct expert ids (device); a padding entry may hold any valid id.
            live: `[C]` bool, False for padding entries.
            lut: `[E]` slot of each expert of `layer`, -1 where it is not resident and ready.

        Returns:
            `[C, N]` expert blocks; a padding row holds whatever the memory held (the CPU path
            sets its every bit, a NaN in each float format, so that a use of one shows).
        """
        ids = ids.to(torch.long)
        rows = torch.empty(ids.numel(), self.store.layout.numel, dtype=self.store.layout.dtype,
                           device=ids.device)  # [C, N]
        if self._copier is not None:  # a padding entry is no first occurrence: not copied
            place = torch.arange(ids.numel(), device=ids.device)  # [C]
            first = torch.where(live, place, -1)
            self._copier.copy(self.store.arena(layer), self.pool.storage, rows, ids, lut, first)
            return rows
        slots = lut[ids]  # [C]
        host = self.store.arena(layer).view(self.store.num_experts, -1)[ids]  # [C, N]
        pool = self.pool.storage.view(self.pool.num_slots, -1)[slots.clamp(min=0)]
        rows.copy_(torch.where((slots >= 0)[:, None], pool, host))
        rows.view(torch.uint8).masked_fill_(~live[:, None], 0xFF)
        return rows


class _CudaRowCopier:
    """The CuPy kernel behind `MappedFetcher` on CUDA, launched on torch's current stream."""

    def __init__(self, device: torch.device) -> None:
        self._launch = CupyLauncher(device, _KERNEL, "fetch_rows")

    def copy(self, host: torch.Tensor, pool: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor,
             lut: torch.Tensor, first: torch.Tensor | None, misses_only: bool = False) -> None:
        cupy = self._launch.cupy
        j, n = rows.shape
        n16 = n * rows.element_size() // 16
        ids = ids.contiguous()
        self._launch(rows.device, (_BLOCKS_PER_ROW, j), (_THREADS,),
                     (cupy.uint64(host.data_ptr()), cupy.uint64(pool.data_ptr()),
                      cupy.uint64(rows.data_ptr()), cupy.uint64(ids.data_ptr()),
                      cupy.uint64(lut.data_ptr()),
                      cupy.uint64(0 if first is None else first.data_ptr()),
                      cupy.int64(n16), cupy.int32(int(misses_only))))
