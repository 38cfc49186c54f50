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
and installing it (`uv sync` installs the workspace's packages) makes them visible.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from moe_core.errors import SettingError

__all__ = ["KNOWN_PROVIDERS", "load_plugin", "plugin_names"]

KNOWN_PROVIDERS: dict[tuple[str, str], str] = {
    ("moe_core.policies", "activation"): "moe-infinity",
    ("moe_core.routing_tapes", "traces"): "moe-infinity",
}
"""The package that provides each plug-in the workspace knows of: named in the error when it is
not installed."""


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
        SettingError: no installed package registers it (naming the package that would, if
            known).
    """
    found = [ep for ep in entry_points(group=group) if ep.name == name]
    if not found:
        provider = KNOWN_PROVIDERS.get((group, name))
        hint = (f"install the {provider} package (e.g. `uv sync --all-packages` in this "
                f"workspace, or `pip install {provider}`)" if provider is not None
                else "no installed package provides it")
        raise SettingError(f"{what}: {hint}")
    return found[0].load()
