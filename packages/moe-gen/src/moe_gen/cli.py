"""`moe-gen`: offline, throughput-first batch generation with module-based batching.

The engine's commands arrive with their issues; for now the app reports its version and the
moe-core runtime it runs on.
"""

from __future__ import annotations

import typer

import moe_gen

__all__ = ["app"]

app = typer.Typer(
    help="moe-gen: offline, throughput-first batch generation with module-based batching.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def main() -> None:
    """Keep `moe-gen` a command group, so later commands sit beside `version`."""


@app.command()
def version() -> None:
    """Print the versions of moe-gen and the moe-core runtime."""
    import moe_core

    typer.echo(f"moe-gen {moe_gen.__version__} (moe-core {moe_core.__version__})")
