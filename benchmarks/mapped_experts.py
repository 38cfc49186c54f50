"""One token's MoE layer over slots and host memory: the mapped path's rows-then-products
(`MappedFetcher.fetch_rows` + `gathered_experts` / `gathered_fp8_experts`) against the in-place
kernel (`kernels.mapped_experts`, decision 0019; misses read by it over PCIe, or staged by the
copy kernel first, `MappedFetcher.stage_misses`), at Qwen3-30B-A3B shapes (D 2048, I 768,
128 experts, top-8), bf16 and FP8 blocks, 0-8 of the 8 experts missing (read over PCIe). With no miss, also `moe_experts` (the
resident model's kernel) over the same slots.

Each call picks 8 distinct experts; missing ones rotate through the whole host arena (1.2 GB
bf16), so no call finds another's host bytes in the GPU's L2. CUDA events around each call,
median of `--iters` calls after `--warmup`. Also reports the largest difference between the
two paths' outputs, relative to the largest output.

    PYTHONPATH=packages/moe-core/src python3 benchmarks/mapped_experts.py --out $OUT/mapped_experts.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import torch
from moe_core.gathered_experts import gathered_experts
from moe_core.kernels import mapped_experts, mapped_experts_supported, moe_experts
from moe_core.offload.fp8 import FP8
from moe_core.offload.fp8_gathered import gathered_fp8_experts
from moe_core.offload.gpu_slots import GpuSlotPool
from moe_core.offload.host_store import HostExpertStore
from moe_core.offload.layout import ExpertLayout
from moe_core.offload.mapped_fetch import MappedFetcher

HIDDEN, WIDTH, EXPERTS, TOP_K = 2048, 768, 128, 8


def _store(layout: ExpertLayout, slots: int) -> tuple[HostExpertStore, GpuSlotPool]:
    """A one-layer pinned store of random experts and a pool whose slot s holds expert s."""
    store = HostExpertStore.empty(layout, [0], EXPERTS, pin=True)
    arena = store.arena(0).view(EXPERTS, layout.numel)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for first in range(0, EXPERTS, 16):  # drawn on the GPU, packed, copied down 16 at a time
        n = min(16, EXPERTS - first)
        rows = torch.empty(n, layout.numel, dtype=layout.dtype, device="cuda")
        gate, up, down = (torch.randn(n, *shape, generator=gen, device="cuda") * 0.02
                          for shape in ((WIDTH, HIDDEN), (WIDTH, HIDDEN), (HIDDEN, WIDTH)))
        layout.pack_layer(gate, up, down, rows)
        arena[first : first + n].copy_(rows.cpu())
    pool = GpuSlotPool(layout, slots, device="cuda")
    pool.rows(0, slots).copy_(arena[:slots].cuda())
    return store, pool


def _time(fn: Any, calls: list[tuple[torch.Tensor, torch.Tensor]], warmup: int) -> float:
    """Median milliseconds of `fn(ids, lut)` over `calls` (after `warmup` of them)."""
    times = []
    for n, (ids, lut) in enumerate(calls):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(ids, lut)
        end.record()
        end.synchronize()
        if n >= warmup:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


SLOTS = EXPERTS // 2
"""Experts 0-63 resident in slots 0-63, 64-127 on the host only."""


def measure(store: HostExpertStore, pool: GpuSlotPool, misses: int, iters: int,
            warmup: int) -> dict[str, Any]:
    """One layer call with `misses` of its 8 experts on the host, both ways (`_store`'s)."""
    layout, slots = store.layout, SLOTS
    dtype = layout.dtype
    fetcher = MappedFetcher(store, pool)
    lut = torch.full((EXPERTS,), -1, dtype=torch.long, device="cuda")
    lut[:slots] = torch.arange(slots, device="cuda")
    hidden = torch.randn(1, HIDDEN, dtype=torch.bfloat16, device="cuda")
    weights = torch.rand(1, TOP_K, device="cuda").to(torch.bfloat16)
    calls = []
    for n in range(warmup + iters):  # missing experts rotate over the host half
        host = [slots + (n * misses + j) % (EXPERTS - slots) for j in range(misses)]
        resident = [(n * 7 + j) % slots for j in range(TOP_K - misses)]
        calls.append((torch.tensor([host + resident], device="cuda"), lut))
    pool_rows = pool.storage.view(slots, layout.numel)
    host_rows = store.arena(0).view(EXPERTS, layout.numel)
    assert mapped_experts_supported(hidden, layout, pool_rows, host_rows)

    def rows_then_products(ids: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
        rows, _ = fetcher.fetch_rows(0, ids.reshape(-1), lut, distinct=True)
        if layout.is_fp8:
            return gathered_fp8_experts(hidden, None, weights, layout, rows)
        return gathered_experts(hidden, None, weights, *layout.stacked_views(rows))

    def in_place(ids: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
        return mapped_experts(hidden, ids, weights, lut, pool_rows, host_rows, layout)

    def staged(ids: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
        call_lut, rows = fetcher.stage_misses(0, ids.reshape(-1), lut, TOP_K)
        return mapped_experts(hidden, ids, weights, call_lut, pool_rows, host_rows, layout,
                              staged_rows=rows)

    old = _time(rows_then_products, calls, warmup)
    new = _time(in_place, calls, warmup)
    new_staged = _time(staged, calls, warmup)
    a, b = rows_then_products(*calls[0]).float(), in_place(*calls[0]).float()
    c = staged(*calls[0]).float()
    link_bytes = misses * layout.nbytes
    row: dict[str, Any] = {
        "dtype": str(dtype).removeprefix("torch."), "misses": misses,
        "block_bytes": layout.nbytes, "rows_then_products_ms": round(old, 4),
        "in_place_ms": round(new, 4), "staged_in_place_ms": round(new_staged, 4),
        "speedup_staged": round(old / new_staged, 2),
        "in_place_link_gbps": round(link_bytes / new / 1e6, 1) if misses else None,
        "staged_link_gbps": round(link_bytes / new_staged / 1e6, 1) if misses else None,
        "link_bound_ms_at_50gbps": round(link_bytes / 50e6, 4),
        "max_rel_diff": float((a - b).abs().max() / a.abs().max()),
        "max_rel_diff_staged": float((a - c).abs().max() / a.abs().max())}
    if misses == 0 and not layout.is_fp8:  # the resident kernel over the same slots
        stacks = pool.stacked()
        row["moe_experts_ms"] = round(_time(
            lambda ids, lut: moe_experts(hidden, lut[ids], weights, *stacks), calls, warmup), 4)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--misses", default="0,1,2,4,8")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = []
    for dtype in (torch.bfloat16, FP8):  # one store and pool per dtype, every miss count on it
        store, pool = _store(ExpertLayout(HIDDEN, WIDTH, dtype), SLOTS)
        rows += [measure(store, pool, int(m), args.iters, args.warmup)
                 for m in args.misses.split(",")]
        del store, pool
    for row in rows:
        print(json.dumps(row))
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows},
                                       indent=1) + "\n")


if __name__ == "__main__":
    main()
