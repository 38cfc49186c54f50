"""Cache plans: an eviction policy and the prefetcher that goes with it, chosen by name (what
`moe-core generate --policy NAME --prefetch MODE` and the servers take).

moe-core has `lru` and `lfu`, each with prefetch `none` or `lookahead` (`LookaheadPrefetcher`).
Other packages add named plans through the `moe_core.policies` entry-point group (see
`moe_core.plugins`): moe-infinity's `activation` is activation-aware eviction fed live by its
predictor, which also prefetches when asked to. moe-core never imports them: an entry names a
`CachePlanFactory`, called with the model's spec, the prefetch mode and the plan's options.

Names may carry options: `NAME:key=value,key=value` (e.g. `lookahead:top=4`,
`activation:collection=past.bin`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from moe_core.errors import SettingError
from moe_core.offload.lookahead_prefetcher import LookaheadPrefetcher
from moe_core.offload.policy import EvictionPolicy, LFUPolicy, LRUPolicy
from moe_core.offload.prefetcher import Prefetcher
from moe_core.plugins import KNOWN_PROVIDERS, load_plugin, plugin_names

if TYPE_CHECKING:
    from moe_core.model import MoEForCausalLM
    from moe_core.spec import ModelSpec

__all__ = ["BUILTIN_POLICIES", "POLICY_GROUP", "PREFETCH_MODES", "CachePlan",
           "CachePlanFactory", "PrefetcherFactory", "cache_plan", "parse_named"]

POLICY_GROUP = "moe_core.policies"
BUILTIN_POLICIES = ("lru", "lfu")
PREFETCH_MODES = ("none", "lookahead")

PrefetcherFactory = Callable[["MoEForCausalLM"], Prefetcher]
"""Builds a prefetcher for a loaded model (what `load_offloaded(prefetcher=...)` takes)."""


@dataclass(frozen=True)
class CachePlan:
    """How the on-demand cache decides residency.

    Attributes:
        policy: Which resident expert leaves when a slot is needed.
        prefetcher: Builds the prefetcher once the model is loaded; None: no prefetcher.
    """

    policy: EvictionPolicy
    prefetcher: PrefetcherFactory | None = None


class CachePlanFactory(Protocol):
    """What a `moe_core.policies` entry point names."""

    def __call__(self, spec: ModelSpec, *, prefetch: str,
                 options: Mapping[str, str]) -> CachePlan:
        """The plan for a model of `spec`, with prefetch mode `prefetch` (one of
        `PREFETCH_MODES`) and the plan's own `options`; raises `SettingError` for bad ones."""
        ...


def parse_named(text: str, option: str) -> tuple[str, dict[str, str]]:
    """`NAME[:key=value,...]` -> `(name, options)`; raises `SettingError` naming `option`."""
    name, _, rest = text.strip().partition(":")
    options: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise SettingError(f"{option} {text!r}: options are key=value, got {part!r}")
        options[key.strip()] = value.strip()
    return name.lower(), options


def cache_plan(policy: str, prefetch: str, spec: ModelSpec) -> CachePlan:
    """The plan `--policy policy --prefetch prefetch` names, for a model of `spec`.

    Raises:
        SettingError: an unknown policy or prefetch mode, bad options, or a plug-in policy whose
            package is not installed (naming the package).
    """
    mode, mode_options = parse_named(prefetch, "--prefetch")
    if mode not in PREFETCH_MODES:
        raise SettingError(f"--prefetch must be {' or '.join(PREFETCH_MODES)}, got {prefetch!r}")
    name, options = parse_named(policy, "--policy")
    if name in BUILTIN_POLICIES:
        if options:
            raise SettingError(f"--policy {name} takes no options, got {sorted(options)}")
        evict: EvictionPolicy = LRUPolicy() if name == "lru" else LFUPolicy()
        return CachePlan(evict, _lookahead(mode_options, spec) if mode == "lookahead" else None)
    known = sorted(set(plugin_names(POLICY_GROUP))
                   | {n for g, n in KNOWN_PROVIDERS if g == POLICY_GROUP})
    if name not in known:
        raise SettingError(f"--policy must be {', '.join((*BUILTIN_POLICIES, *known))}, "
                           f"got {policy!r}")
    factory = load_plugin(POLICY_GROUP, name, f"--policy {name}")
    plan = factory(spec, prefetch=prefetch, options=options)  # type: ignore[operator]
    if not isinstance(plan, CachePlan):
        raise TypeError(f"the {POLICY_GROUP} entry {name!r} returned {type(plan).__name__}, "
                        "not a CachePlan")
    return plan


def _lookahead(options: Mapping[str, str], spec: ModelSpec) -> PrefetcherFactory:
    unknown = set(options) - {"top"}
    if unknown:
        raise SettingError(f"--prefetch lookahead takes top=N, got {sorted(unknown)}")
    top = spec.moe.router.top_k
    if "top" in options:
        try:
            top = int(options["top"])
        except ValueError:
            top = 0
        if not 0 < top <= spec.moe.num_experts:
            raise SettingError(f"--prefetch lookahead:top must be in [1, "
                               f"{spec.moe.num_experts}], got {options['top']!r}")

    def build(model: MoEForCausalLM) -> Prefetcher:
        return LookaheadPrefetcher(model, top)

    return build
