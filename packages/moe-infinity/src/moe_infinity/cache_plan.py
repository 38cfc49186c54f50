"""`--policy activation`: the cache plan moe-infinity registers with moe-core (entry point
`activation` of the `moe_core.policies` group), so `moe-core generate --policy activation` runs
activation-aware eviction and prefetching without moe-core importing moe-infinity.

Options (`--policy activation:key=value,...`):

- `collection=FILE`: start from a trace collection saved by `moe-infinity simulate
  --collection-out` (for the same model); default: an empty one, filled as requests finish.
- `capacity=N`: capacity of a new collection (default 1000).
- `learn=0|1`: add each finished request's EAM to the collection (default 1).

`--prefetch lookahead[:top=N]` prefetches the predictor's N best absent experts of the next
layer per layer call (default top-k); `--prefetch none` only feeds the eviction policy.
"""

from __future__ import annotations

from collections.abc import Mapping

from moe_core import (
    CachePlan,
    ModelSpec,
    MoEForCausalLM,
    Prefetcher,
    PrefetcherFactory,
    SettingError,
    parse_named,
)

from moe_infinity.activation_prefetcher import ActivationPrefetcher
from moe_infinity.collection import TraceCollection
from moe_infinity.model_shape import ModelShape
from moe_infinity.policies import ActivationAwarePolicy

__all__ = ["activation_plan"]

_OPTIONS = ("collection", "capacity", "learn")


def activation_plan(spec: ModelSpec, *, prefetch: str, options: Mapping[str, str]
                    ) -> CachePlan:
    """The `activation` plan for a model of `spec` (see the module docstring).

    Raises:
        SettingError: an unknown option or value, or a collection file for another model.
    """
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise SettingError(f"--policy activation: unknown option {unknown[0]!r} (expected "
                           f"{', '.join(_OPTIONS)})")
    shape = ModelShape.from_spec("model", spec)
    collection = (TraceCollection.load(options["collection"], expect=shape)
                  if "collection" in options
                  else TraceCollection(shape, _positive(options, "capacity", 1000)))
    learn = options.get("learn", "1")
    if learn not in ("0", "1"):
        raise SettingError(f"--policy activation:learn must be 0 or 1, got {learn!r}")
    budget = _budget(prefetch, spec)
    policy = ActivationAwarePolicy(shape)

    def build(model: MoEForCausalLM) -> Prefetcher:
        return ActivationPrefetcher(model, policy, collection, budget=budget,
                                    learn=learn == "1")

    factory: PrefetcherFactory = build
    return CachePlan(policy, factory)


def _budget(prefetch: str, spec: ModelSpec) -> int:
    mode, options = parse_named(prefetch, "--prefetch")
    if mode == "none":
        return 0
    if mode != "lookahead" or set(options) - {"top"}:
        raise SettingError(f"--prefetch must be none or lookahead[:top=N], got {prefetch!r}")
    top = _positive(options, "top", spec.moe.router.top_k)
    if top > spec.moe.num_experts:
        raise SettingError(f"--prefetch lookahead:top must be in [1, {spec.moe.num_experts}], "
                           f"got {top}")
    return top


def _positive(options: Mapping[str, str], name: str, default: int) -> int:
    if name not in options:
        return default
    try:
        value = int(options[name])
    except ValueError:
        value = 0
    if value <= 0:
        raise SettingError(f"{name} must be a positive integer, got {options[name]!r}")
    return value
