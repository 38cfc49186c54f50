"""The serving engine's settings, validated once."""

from __future__ import annotations

from dataclasses import dataclass

from moe_core import SettingError

__all__ = ["EngineConfig"]


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """How the engine batches and queues.

    Attributes:
        max_batch: Most requests running (decoding or prefilling) at once.
        max_queue: Most requests waiting to start; more are refused (HTTP 429).
        prefill_chunk: Most prompt tokens prefilled per engine step, so a long prompt does not
            stall the running streams.
        block_tokens: Tokens per KV block.
        kv_bytes: Memory of the KV pool (on the compute device).
        lookahead_top: Experts kept per step and layer in a trace's lookahead.
        graphs: Replay decode passes from captured CUDA graphs where the model allows it
            (`captured_decode`); False: every pass eager (`--no-graphs`).
        overlap: Enqueue the next decode pass before a step's host work where its rows are
            known (docs/decisions/0017); False: every step's host work runs between passes.
    """

    max_batch: int = 64
    max_queue: int = 256
    prefill_chunk: int = 256
    block_tokens: int = 16
    kv_bytes: int = 64 << 20
    lookahead_top: int = 8
    graphs: bool = True
    overlap: bool = True

    def __post_init__(self) -> None:
        for name, option in (("max_batch", "--max-batch"), ("max_queue", "--max-queue"),
                             ("prefill_chunk", "--prefill-chunk"),
                             ("block_tokens", "--block-tokens"), ("kv_bytes", "--kv-memory"),
                             ("lookahead_top", "lookahead_top")):
            value = getattr(self, name)
            if value <= 0:
                raise SettingError(f"{option} must be positive, got {value}")
