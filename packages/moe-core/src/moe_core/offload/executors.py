"""The offloaded expert executors and their installer, in one import.

Each lives in its own module: `offloaded_executor` (on demand, cached, prefetch hints, CPU compute
for misses), `streaming_executor` (a ring of slots for large batches), `slot_cache` (the GPU cache
shared by every layer), `runtime` (`install_offloading`).
"""

from __future__ import annotations

from moe_core.offload.offloaded_executor import CpuComputeRule, OffloadedExecutor
from moe_core.offload.runtime import OffloadKind, OffloadRuntime, install_offloading
from moe_core.offload.slot_cache import ExpertSlotCache
from moe_core.offload.stats import OffloadStats
from moe_core.offload.streaming_executor import ExpertRing, StreamingExecutor

__all__ = [
    "CpuComputeRule",
    "ExpertRing",
    "ExpertSlotCache",
    "OffloadKind",
    "OffloadRuntime",
    "OffloadStats",
    "OffloadedExecutor",
    "StreamingExecutor",
    "install_offloading",
]
