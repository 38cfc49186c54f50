"""The engine's state as last published by its thread: what /metrics and /health read.

Other threads never touch the engine's scheduler or the offload runtime; the engine thread
builds one of these after every step and swaps it in (a single reference assignment).
"""

from __future__ import annotations

from dataclasses import dataclass

from moe_core import OffloadStats

__all__ = ["EngineSnapshot"]


@dataclass(frozen=True)
class EngineSnapshot:
    """Counts at one moment.

    Attributes:
        queued: Requests waiting to start.
        running: Requests in the running batch.
        kv_blocks_used: KV blocks owned by running requests.
        kv_blocks_total: KV blocks in the pool.
        steps: Engine steps run since start.
        steps_ahead: Decode passes enqueued before the previous step's host work
            (docs/decisions/0017).
        offload: The offload runtime's counters (None: experts are not offloaded).
        experts_resident: Experts in device slots now.
        expert_slots: Device slots for experts.
        traces_collected: EAMs in the trace collection.
    """

    queued: int = 0
    running: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    steps: int = 0
    steps_ahead: int = 0
    offload: OffloadStats | None = None
    experts_resident: int = 0
    expert_slots: int = 0
    traces_collected: int = 0
