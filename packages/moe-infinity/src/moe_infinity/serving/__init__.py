"""`moe-infinity serve` and `moe-infinity chat`: the serving engine (continuous batching over an
offloaded model, one engine thread) and its front ends (OpenAI-compatible HTTP in
`moe_infinity.serving.app`, the terminal chat in `moe_infinity.serving.chat_session`).
See docs/moe-infinity.md and docs/decisions/0008-serving-engine.md.

The engine-level API is exported here; the HTTP app is imported from its module (it pulls in
FastAPI).
"""

from moe_infinity.serving.engine import Engine, QueueFullError, ShuttingDownError
from moe_infinity.serving.engine_config import EngineConfig
from moe_infinity.serving.engine_setup import EngineSettings, build_engine
from moe_infinity.serving.engine_snapshot import EngineSnapshot
from moe_infinity.serving.request import (
    FinishReason,
    GenerationRequest,
    SequenceEvent,
    TokenLogprob,
)
from moe_infinity.serving.runtime_policy import SERVE_POLICIES, ServePolicy
from moe_infinity.serving.serving_model import ServingModel, load_serving_model

__all__ = [
    "SERVE_POLICIES",
    "Engine",
    "EngineConfig",
    "EngineSettings",
    "EngineSnapshot",
    "FinishReason",
    "GenerationRequest",
    "QueueFullError",
    "SequenceEvent",
    "ServePolicy",
    "ServingModel",
    "ShuttingDownError",
    "TokenLogprob",
    "build_engine",
    "load_serving_model",
]
