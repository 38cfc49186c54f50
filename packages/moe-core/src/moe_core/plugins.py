"""Plug-ins that other packages offer moe-core through Python entry points, found without
importing those packages by name (moe-core never imports a tool; dependencies point into it).

Two groups:

- `moe_core.policies`: named expert-cache strategies for `--policy NAME` (an eviction policy and
  the prefetcher that feeds it), each entry a `CachePlanFactory` (`moe_core.offload.cache_plans`).
  moe-infinity registers `activation`.
- `moe_core.routing_tapes`: readers of recorded routing for `routing_for(model, "replay:PATH")`,
  each entry a `TapeLoader` (path -> `RoutingTape`). moe-infinity registers `traces` (its trace
  files).

A package declares them in its `pyproject.toml` (`[project.entry-points."moe_core.policies"]`),
and installing it (`uv sync` installs the workspace's packages) makes them visible. The plug-ins
this workspace ships are also found without installing, when their package is importable from
a source tree (`PYTHONPATH=packages/moe-infinity/src`, as on a machine with no package
installer): `KNOWN_PROVIDERS` names the object each entry point would.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points

from moe_core.errors import SettingError

__all__ = ["KNOWN_PROVIDERS", "Provider", "load_plugin", "plugin_names"]


@dataclass(frozen=True)
class Provider:
    """Where a known plug-in comes from.

    Attributes:
        package: The distribution that registers it (named in the error when it is missing).
        target: `module:attribute`, the object its entry point names.
    """

    package: str
    target: str


KNOWN_PROVIDERS: dict[tuple[str, str], Provider] = {
    ("moe_core.policies", "activation"): Provider("moe-infinity",
                                                  "moe_infinity.cache_plan:activation_plan"),
    ("moe_core.routing_tapes", "traces"): Provider("moe-infinity",
                                                   "moe_infinity.routing_tape:load_routing_tape"),
}
"""The plug-ins the workspace ships: loaded from `target` when no entry point is registered
(a source tree on `PYTHONPATH`), else named in the error."""


def plugin_names(group: str) -> list[str]:
    """Names registered in entry-point `group`, sorted."""
    return sorted({ep.name for ep in entry_points(group=group)})


def load_plugin(group: str, name: str, what: str) -> object:
    """The object entry point `name` of `group` refers to (its module imported now).

    Args:
        group: The entry-point group.
        name: The entry's name.
        what: How the user named it, for the error (e.g. `--policy activation`).

    Raises:
        SettingError: no installed package registers it and its known provider (if any) cannot
            be imported (naming the package that would provide it).
    """
    found = [ep for ep in entry_points(group=group) if ep.name == name]
    if found:
        return found[0].load()
    provider = KNOWN_PROVIDERS.get((group, name))
    if provider is None:
        raise SettingError(f"{what}: no installed package provides it")
    module, _, attribute = provider.target.partition(":")
    try:
        return getattr(importlib.import_module(module), attribute)
    except ImportError:
        raise SettingError(f"{what}: install the {provider.package} package (e.g. `uv sync "
                           f"--all-packages` in this workspace, or `pip install "
                           f"{provider.package}`)") from None
