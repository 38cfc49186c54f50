"""A plain install from a checkout is a real copy: `pip install packages/moe-core packages/moe-cap`
and the uv equivalent leave no link into the checkout, so moving or deleting the checkout breaks
nothing (issue 14: uv installed moe-core, which moe-cap requires, as an editable link because of
the workspace sources; the root pyproject's `[tool.uv.pip] no-sources` stops that).

Offline: the new environment sees the workspace environment's packages (torch, typer, hatchling...)
through a path file, pip and uv install only the two members, built with hatchling from there.
The workspace's own editable links are not followed: a path file's plain path lines add a folder,
they do not run the `.pth` files inside it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MEMBERS = ("moe-core", "moe-cap")
pytestmark = pytest.mark.slow


def copy_checkout(dest: Path) -> Path:
    """A copy of this checkout's workspace files and packages (no environment, no caches)."""
    dest.mkdir()
    for name in ("pyproject.toml", "uv.lock", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(ROOT / "packages", dest / "packages",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "build", "dist"))
    return dest


def chain_to_this_environment(venv: Path) -> Path:
    """Let `venv` import what this test's environment has (appended after its own packages)."""
    python = venv / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()"
                              "['purelib'])"], capture_output=True, text=True, check=True)
    Path(purelib.stdout.strip(), "_workspace_environment.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n")
    return python


def third_party_requirements(checkout: Path) -> list[str]:
    """Every dependency of the members that is not a member itself."""
    names = []
    for member in MEMBERS:
        project = tomllib.loads((checkout / "packages" / member / "pyproject.toml").read_text())
        for requirement in project["project"]["dependencies"]:
            name = requirement.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip()
            if name not in MEMBERS:
                names.append(name)
    return sorted(set(names))


def run(args: list[str | Path], cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "UV_PROJECT_ENVIRONMENT")}
    done = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                          env={**env, "HF_HUB_OFFLINE": "1", "PIP_NO_INPUT": "1"}, timeout=300)
    assert done.returncode == 0, f"{args}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    return done.stdout


def assert_installed_copy_outlives_the_checkout(venv: Path, checkout: Path, tmp: Path) -> None:
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp)
    for name in ("moe_core", "moe_cap"):
        direct = json.loads(next(Path(site.strip()).glob(f"{name}-*.dist-info"))
                            .joinpath("direct_url.json").read_text())
        assert not direct.get("dir_info", {}).get("editable"), f"{name} is editable: {direct}"
    shutil.move(checkout, tmp / "moved")
    shutil.rmtree(tmp / "moved")
    where = run([python, "-c", "import moe_core, moe_cap.cli; print(moe_core.__file__); "
                 "print(moe_cap.cli.__file__)"], tmp)
    assert all(line.startswith(str(venv)) for line in where.split()), where
    report = json.loads(run([bin_dir / "moe-core", "inspect", "tiny-moe", "--json"], tmp))
    assert report["architecture"] == "Qwen3MoeForCausalLM"  # the embedded model's files came too
    for script in ("moe-core", "moe-cap"):  # each tool's command runs the environment's Python
        assert (bin_dir / script).read_text().splitlines()[0] == f"#!{python}"


def test_pip_install_is_a_copy_that_outlives_the_checkout(tmp_path: Path) -> None:
    checkout = copy_checkout(tmp_path / "checkout")
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv], tmp_path)
    python = chain_to_this_environment(venv)
    run([python, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
         "--no-build-isolation", *(f"packages/{m}" for m in MEMBERS)], checkout)
    assert_installed_copy_outlives_the_checkout(venv, checkout, tmp_path)


def uv_binary() -> str | None:
    """uv as `make` finds it: `$UV` (set by `uv run`), on PATH, or in `.tools/`."""
    for candidate in (os.environ.get("UV"), shutil.which("uv"), ROOT / ".tools" / "bin" / "uv"):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    return None


@pytest.mark.skipif(uv_binary() is None, reason="uv is not installed here")
def test_uv_pip_install_is_a_copy_that_outlives_the_checkout(tmp_path: Path) -> None:
    uv = uv_binary()
    assert uv is not None
    checkout = copy_checkout(tmp_path / "checkout")
    venv = tmp_path / "venv"
    run([uv, "venv", "--quiet", "--python", sys.executable, venv], tmp_path)
    python = chain_to_this_environment(venv)
    excluded = tmp_path / "third-party.txt"
    excluded.write_text("\n".join(third_party_requirements(checkout)) + "\n")
    # Run in the checkout, as the README says: its pyproject's `[tool.uv.pip]` applies. Deps are
    # resolved (that is where moe-cap's requirement on moe-core met the workspace source) except
    # the third-party ones, which this offline environment already has.
    run([uv, "pip", "install", "--quiet", "--offline", "--no-build-isolation", "--python", python,
         "--cache-dir", tmp_path / "uv-cache", "--excludes", excluded,
         *(f"packages/{m}" for m in MEMBERS)], checkout)
    assert_installed_copy_outlives_the_checkout(venv, checkout, tmp_path)
