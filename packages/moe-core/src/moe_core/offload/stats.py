"""Counters of one offloaded run: cache hits and misses, prefetches, copies, stalls, CPU compute.

The executors count into one shared `OffloadStats`; the engines expose it and print `summary()`
for `--stats` (issue #4, and MoE-Infinity's users asking for hit-rate visibility, its issue #32).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

__all__ = ["OffloadStats"]


@dataclass
class OffloadStats:
    """What the offload runtime did, summed over every layer.

    Every routed expert a layer uses in one call counts once ("an expert use"), as a hit, a miss
    or a CPU computation: `hits + misses + cpu_experts == expert_uses`.

    Attributes:
        hits: Uses of an expert already in a GPU slot (or on its way there, e.g. prefetched).
        misses: Uses that had to fetch the expert on demand (a copy, or a mapped read).
        prefetches_issued: Prefetch copies submitted.
        prefetches_used: Prefetched experts later used before being evicted.
        prefetches_cancelled: Prefetches cancelled before their copy started.
        prefetches_wasted: Prefetched experts evicted or cancelled without a use.
        evictions: Experts pushed out of a slot to make room.
        bytes_copied: Host-to-device bytes of every copy that was not cancelled, mapped reads
            included.
        mapped_bytes: Of those, bytes the GPU read straight from mapped host memory (the
            mapped fetch path; no copy engine involved, so not in `copy_seconds`).
        streamed_bytes: Of those, bytes of misses copied into the prefill ring and computed
            there, never admitted to the cache (`prefill="stream"`, `PrefillRing`).
        copy_seconds: Time the copy engine spent copying (device time on CUDA).
        stall_seconds: Time compute waited for copies: host time inside a blocking wait on the
            CPU engine; on CUDA, the compute stream's idle gap measured with events.
        cpu_experts: Expert uses computed on the CPU from the host store instead of fetched.
        cpu_tokens: Token-expert pairs computed on the CPU.
        cpu_bytes: Expert bytes the CPU lane of two-lane decode read from host memory (not in
            `bytes_copied`: they never cross PCIe).
        cpu_seconds: Time the CPU lane's worker spent computing experts (it overlaps the GPU).
    """

    hits: int = 0
    misses: int = 0
    prefetches_issued: int = 0
    prefetches_used: int = 0
    prefetches_cancelled: int = 0
    prefetches_wasted: int = 0
    evictions: int = 0
    bytes_copied: int = 0
    mapped_bytes: int = 0
    streamed_bytes: int = 0
    copy_seconds: float = 0.0
    stall_seconds: float = 0.0
    cpu_experts: int = 0
    cpu_tokens: int = 0
    cpu_bytes: int = 0
    cpu_seconds: float = 0.0

    @property
    def expert_uses(self) -> int:
        """Expert uses counted (`hits + misses + cpu_experts`)."""
        return self.hits + self.misses + self.cpu_experts

    @property
    def hit_rate(self) -> float:
        """Hits over GPU uses (`hits + misses`); 0.0 before any."""
        gpu_uses = self.hits + self.misses
        return self.hits / gpu_uses if gpu_uses else 0.0

    def merge(self, other: OffloadStats) -> OffloadStats:
        """A new `OffloadStats` with every counter of `self` and `other` added."""
        return OffloadStats(**{f.name: getattr(self, f.name) + getattr(other, f.name)
                               for f in fields(self)})

    def copy(self) -> OffloadStats:
        """An independent copy (a snapshot)."""
        return OffloadStats(**{f.name: getattr(self, f.name) for f in fields(self)})

    def summary(self) -> dict[str, int | float]:
        """Every counter plus `expert_uses` and `hit_rate`, as a JSON-ready dict."""
        out: dict[str, int | float] = {f.name: getattr(self, f.name) for f in fields(self)}
        out["expert_uses"] = self.expert_uses
        out["hit_rate"] = self.hit_rate
        return out
