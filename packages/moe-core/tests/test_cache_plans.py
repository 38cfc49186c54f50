"""Cache plans by name: moe-core's own (lru, lfu, with or without lookahead) and plug-ins found
through the `moe_core.policies` entry points, with one clear line when the plug-in's package is
not installed."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from importlib.metadata import entry_points

import pytest
from moe_core import (
    CachePlan,
    LFUPolicy,
    LookaheadPrefetcher,
    LRUPolicy,
    ModelSpec,
    SettingError,
    cache_plan,
    load_model,
    parse_named,
    tiny_model_path,
)
from moe_core import plugins as plugins_module
from moe_core.cli import app
from typer.testing import CliRunner


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    return ModelSpec.from_pretrained(tiny_model_path())


def test_builtin_plans(spec: ModelSpec) -> None:
    plain = cache_plan("lru", "none", spec)
    assert isinstance(plain.policy, LRUPolicy) and plain.prefetcher is None
    ahead = cache_plan("LFU", "lookahead:top=4", spec)
    assert isinstance(ahead.policy, LFUPolicy) and ahead.prefetcher is not None
    prefetcher = ahead.prefetcher(load_model(tiny_model_path(), dtype="float32"))
    assert isinstance(prefetcher, LookaheadPrefetcher) and prefetcher.top == 4


def test_options_parse() -> None:
    assert parse_named("activation:collection=a.bin, learn=0", "--policy") == (
        "activation", {"collection": "a.bin", "learn": "0"})
    with pytest.raises(SettingError, match="key=value"):
        parse_named("activation:oops", "--policy")


class _EntryPoint:
    def __init__(self, name: str, target: object) -> None:
        self.name = name
        self._target = target

    def load(self) -> object:
        return self._target


def test_a_plugin_policy_is_found_through_its_entry_point(spec: ModelSpec,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    seen: dict[str, object] = {}

    def factory(spec: ModelSpec, *, prefetch: str, options: Mapping[str, str]) -> CachePlan:
        seen.update(prefetch=prefetch, options=dict(options))
        return CachePlan(LRUPolicy())

    def fake(group: str) -> list[_EntryPoint]:
        return [_EntryPoint("mine", factory)] if group == "moe_core.policies" else []

    monkeypatch.setattr(plugins_module, "entry_points", fake)
    plan = cache_plan("mine:x=1", "lookahead", spec)
    assert isinstance(plan.policy, LRUPolicy)
    assert seen == {"prefetch": "lookahead", "options": {"x": "1"}}


def test_from_a_source_tree_the_known_provider_is_imported(spec: ModelSpec,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    # No entry points (PYTHONPATH=packages/*/src, nothing installed), moe_infinity importable.
    monkeypatch.setattr(plugins_module, "entry_points", lambda group: [])
    from moe_infinity.cache_plan import activation_plan

    loaded = plugins_module.load_plugin("moe_core.policies", "activation", "--policy activation")
    assert loaded is activation_plan
    assert cache_plan("activation", "none", spec).policy is not None


def test_the_known_providers_name_what_the_installed_entry_points_name() -> None:
    # The source-tree fallback must load the same objects as the installed workspace.
    for (group, name), provider in plugins_module.KNOWN_PROVIDERS.items():
        found = [ep for ep in entry_points(group=group) if ep.name == name]
        assert len(found) == 1 and found[0].value == provider.target, (group, name)


def test_without_moe_infinity_the_activation_policy_names_the_package(
        spec: ModelSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(plugins_module, "entry_points", lambda group: [])
    monkeypatch.setitem(sys.modules, "moe_infinity.cache_plan", None)  # not importable
    with pytest.raises(SettingError, match="install the moe-infinity package"):
        cache_plan("activation", "none", spec)
    result = CliRunner().invoke(app, ["generate", "-p", "x", "--expert-memory", "4MiB",
                                      "--policy", "activation"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--policy activation" in lines[0] and "moe-infinity" in lines[0]


def test_unknown_policies_list_what_exists(spec: ModelSpec) -> None:
    with pytest.raises(SettingError, match="--policy must be lru, lfu, activation"):
        cache_plan("mru", "none", spec)
    with pytest.raises(SettingError, match="takes no options"):
        cache_plan("lru:x=1", "none", spec)
