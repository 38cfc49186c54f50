"""The Typer app every tool's command line is built on.

`tool_app` gives each tool the same edges: `--version`, examples at the foot of `--help`, and
every command run inside the one error handler (`moe_core.cli_errors.reported_errors`), so a
command's body only parses, calls the library and prints.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any, ClassVar

import typer
from typer.core import TyperGroup

from moe_core.cli_errors import reported_errors

__all__ = ["tool_app"]


class _ToolGroup(TyperGroup):
    """A command group whose commands end through `reported_errors`."""

    tool: ClassVar[str] = ""
    resumable: ClassVar[frozenset[str]] = frozenset()

    def invoke(self, ctx: typer.Context) -> Any:  # type: ignore[override]
        """Run the chosen command inside the shared error handler."""
        with reported_errors(self.tool, lambda: ctx.invoked_subcommand in self.resumable):
            return super().invoke(ctx)


def tool_app(name: str, version: str, help: str, examples: Sequence[str], *,
             resumable: Collection[str] = (), runtime_version: str | None = None) -> typer.Typer:
    """A Typer app for the tool `name`.

    Args:
        name: The command (`"moe-gen"`).
        version: The tool's version.
        help: One line saying what the tool is.
        examples: Command lines shown under "Examples" at the foot of `--help`.
        resumable: Commands that resume when rerun after an interruption (Ctrl-C says so).
        runtime_version: moe-core's version, shown by `--version` beside the tool's own.
    """
    line = f"{name} {version}" + (f" (moe-core {runtime_version})" if runtime_version else "")
    group = type("ToolGroup", (_ToolGroup,), {"tool": f"{name} {version}",
                                              "resumable": frozenset(resumable)})
    epilog = "Examples:\n\n" + "\n\n".join(f"  {e}" for e in examples)
    app = typer.Typer(name=name, help=help, epilog=epilog, cls=group, no_args_is_help=True,
                      add_completion=False, pretty_exceptions_enable=False)

    def show_version(value: bool) -> None:
        if value:
            typer.echo(line)
            raise typer.Exit()

    # The option is a default value, not an `Annotated` hint: hints are read as strings in the
    # module's namespace, where this function's `show_version` does not exist.
    @app.callback()
    def main(_version: bool = typer.Option(False, "--version", callback=show_version,
                                           is_eager=True, help="Print the version and exit.")
             ) -> None:
        """Options common to every command of the tool."""

    return app
