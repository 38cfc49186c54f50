"""`moe-infinity`: latency-first serving with activation-aware expert offloading.

The engine's commands arrive with their issues; for now the app reports its version and the
moe-core runtime it runs on.
"""

from __future__ import annotations

import typer

import moe_infinity

__all__ = ["app"]

app = typer.Typer(
    help="moe-infinity: latency-first serving with activation-aware expert offloading.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def main() -> None:
    """Keep `moe-infinity` a command group, so later commands sit beside `version`."""


@app.command()
def version() -> None:
    """Print the versions of moe-infinity and the moe-core runtime."""
    import moe_core

    typer.echo(f"moe-infinity {moe_infinity.__version__} (moe-core {moe_core.__version__})")
