"""`moe-cap`: cost, accuracy and performance benchmarking of MoE systems.

The engine's commands arrive with their issues; for now the app reports its version and the
moe-core runtime it runs on.
"""

from __future__ import annotations

import typer

import moe_cap

__all__ = ["app"]

app = typer.Typer(
    help="moe-cap: cost, accuracy and performance benchmarking of MoE systems.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def main() -> None:
    """Keep `moe-cap` a command group, so later commands sit beside `version`."""


@app.command()
def version() -> None:
    """Print the versions of moe-cap and the moe-core runtime."""
    import moe_core

    typer.echo(f"moe-cap {moe_cap.__version__} (moe-core {moe_core.__version__})")
