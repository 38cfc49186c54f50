"""The `--policy` choice: which eviction policy the offload runtime's expert cache runs.

Kept in one function so that the activation-aware prefetcher of issue 15 can replace the
`activation` branch in one place. Until then `activation` is moe-infinity's
`ActivationAwarePolicy` (the victim is the expert the running requests are least likely to need,
fed by `ActivationFeed` after every engine step); `lru` and `lfu` are moe-core's.
"""

from __future__ import annotations

from typing import Literal

from moe_core import EvictionPolicy, LFUPolicy, LRUPolicy, SettingError

from moe_infinity.model_shape import ModelShape
from moe_infinity.policies import ActivationAwarePolicy

__all__ = ["SERVE_POLICIES", "ServePolicy", "eviction_policy", "parse_serve_policy"]

ServePolicy = Literal["activation", "lru", "lfu"]
SERVE_POLICIES: tuple[ServePolicy, ...] = ("activation", "lru", "lfu")


def parse_serve_policy(text: str) -> ServePolicy:
    """`--policy`'s value.

    Raises:
        SettingError: not one of `SERVE_POLICIES`.
    """
    for name in SERVE_POLICIES:
        if text == name:
            return name
    raise SettingError(f"--policy must be one of {', '.join(SERVE_POLICIES)}, got {text!r}")


def eviction_policy(name: ServePolicy, shape: ModelShape) -> EvictionPolicy:
    """A fresh eviction policy of kind `name` for a model of `shape`."""
    if name == "lru":
        return LRUPolicy()
    if name == "lfu":
        return LFUPolicy()
    return ActivationAwarePolicy(shape)
