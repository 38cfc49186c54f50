"""The moe-infinity command line: help and version work without a GPU or a model."""

from __future__ import annotations

import moe_core
import moe_infinity
from moe_infinity.cli import app
from typer.testing import CliRunner


def test_help_lists_commands() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "version" in result.output


def test_version_names_both_packages() -> None:
    result = CliRunner().invoke(app, ["version"])
    assert result.exit_code == 0
    assert f"moe-infinity {moe_infinity.__version__}" in result.output
    assert f"moe-core {moe_core.__version__}" in result.output
