"""Workspace rules that span packages: every package installs a CLI, and imports point one way
(tools import moe-core's public API, never each other)."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"moe-core": "moe_core", "moe-gen": "moe_gen", "moe-infinity": "moe_infinity",
            "moe-cap": "moe_cap"}
TOOLS = ("moe_gen", "moe_infinity", "moe_cap")


def _imports(package: str) -> set[tuple[str, str]]:
    """`(file, imported module)` for every import in a package's source."""
    found = set()
    src = ROOT / "packages" / package.replace("_", "-") / "src" / package
    for path in src.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update((path.name, alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add((path.name, node.module))
    return found


@pytest.mark.parametrize(("dist", "module"), PACKAGES.items())
def test_each_package_declares_its_cli(dist: str, module: str) -> None:
    meta = tomllib.loads((ROOT / "packages" / dist / "pyproject.toml").read_text())
    assert meta["project"]["name"] == dist
    assert meta["project"]["scripts"][dist] == f"{module}.cli:app"
    if dist != "moe-core":
        assert "moe-core" in meta["project"]["dependencies"]


def test_moe_core_imports_no_tool() -> None:
    bad = {(f, m) for f, m in _imports("moe_core") if m.split(".")[0] in TOOLS}
    assert not bad


@pytest.mark.parametrize("tool", TOOLS)
def test_tools_do_not_import_each_other_or_core_internals(tool: str) -> None:
    for file, module in _imports(tool):
        top = module.split(".")[0]
        assert top not in set(TOOLS) - {tool}, f"{tool}/{file} imports {module}"
        # Siblings use moe-core's public API: its top-level package, nothing below it.
        assert top != "moe_core" or module == "moe_core", f"{tool}/{file} imports {module}"


# moe-core's module tree (transformers' names) is its own business: the tools drive a model
# through its step interface (`embed`, `layers[i].attend / mix / router_logits`, `logits`).
_INTERNAL_ATTRIBUTES = ("model.layers", "self_attn", "input_layernorm",
                        "post_attention_layernorm", "embed_tokens", "lm_head", "rotary")


def _interface_violations(source: str) -> list[str]:
    """The reaches into moe-core's module tree or private modules in `source`."""
    found = []
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            parts = [node.attr]
            inner = node.value
            while isinstance(inner, ast.Attribute):
                parts.append(inner.attr)
                inner = inner.value
            chain = ".".join(reversed(parts))  # `a.model.layers` -> `model.layers`
            found += [f".{chain}" for name in _INTERNAL_ATTRIBUTES
                      if chain == name or chain.endswith("." + name)]
        elif (isinstance(node, ast.ImportFrom) and node.module and node.level == 0
              and node.module.startswith("moe_core.")):
            found.append(f"import from {node.module}")
    return found


@pytest.mark.parametrize("tool", TOOLS)
def test_tools_drive_models_through_the_step_interface(tool: str) -> None:
    root = ROOT / "packages" / tool.replace("_", "-")
    for path in [*root.glob("src/**/*.py"), *root.glob("tests/**/*.py")]:
        bad = _interface_violations(path.read_text(encoding="utf-8"))
        assert not bad, f"{path.relative_to(ROOT)} reaches into moe-core: {bad}"


def test_the_interface_rule_sees_module_walks_and_private_imports() -> None:
    source = ("from moe_core.offload.stats import OffloadStats\n"
              "x = net.model.layers[0].self_attn.q_proj\n"
              "y = net.layers[0].attend(h, inputs, kv)\n")
    assert set(_interface_violations(source)) == {"import from moe_core.offload.stats",
                                                  ".self_attn", ".model.layers"}


def test_cupy_is_not_imported_at_import_time() -> None:
    import subprocess
    import sys

    code = "import sys, moe_core, moe_gen, moe_infinity, moe_cap; print('cupy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
