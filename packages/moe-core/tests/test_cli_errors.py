"""The one way every tool's command ends when it fails: a user's mistake is one line and exit 1,
a bug shows its traceback and asks for a report, Ctrl-C and SIGTERM say "interrupted" (and how
to resume where the command resumes), exit 130 and 143."""

from __future__ import annotations

import os
import signal

import pytest
import typer
from moe_core import MoEError, SettingError, tool_app
from typer.testing import CliRunner


def make_app(exc: BaseException | None) -> typer.Typer:
    app = tool_app("moe-demo", "9.9", "A demo tool.", ["moe-demo go"], resumable=("go",))

    @app.command()
    def go() -> None:
        """Fail as told."""
        if exc is not None:
            raise exc
        typer.echo("done")

    @app.command()
    def once() -> None:
        """The same, for a command that does not resume."""
        if exc is not None:
            raise exc

    @app.command()
    def terminate() -> None:
        """Receive SIGTERM."""
        os.kill(os.getpid(), signal.SIGTERM)

    @app.command()
    def disguised() -> None:
        """Receive SIGTERM inside a library that turns it into its own error (torch does)."""
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        except BaseException as inner:
            raise MoEError(f"model.safetensors: cannot read tensor 'w' ({inner!r})") from inner

    @app.command()
    def disguised_int() -> None:
        """Receive SIGINT the same way, disguised as a library's ValueError."""
        try:
            os.kill(os.getpid(), signal.SIGINT)
        except BaseException:
            raise ValueError("could not determine the shape of object type") from None

    return app


def run(exc: BaseException | None, command: str = "go") -> tuple[int, str]:
    result = CliRunner().invoke(make_app(exc), [command])
    return result.exit_code, result.stderr


@pytest.mark.parametrize("exc", [MoEError("bad --thing: it is\nwrong"),
                                 SettingError("temperature must be >= 0, got -1")])
def test_user_mistakes_are_one_line(exc: MoEError) -> None:
    code, err = run(exc)
    assert code == 1
    assert err.splitlines() == ["error: " + " ".join(str(exc).split())]


@pytest.mark.parametrize("exc", [ValueError("internal"), OSError(5, "I/O error"),
                                 KeyError("x"), AssertionError()])
def test_anything_else_is_a_bug_with_its_traceback(exc: Exception) -> None:
    code, err = run(exc)
    assert code == 1
    assert "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1].startswith("error: this is a bug in moe-demo 9.9")


def test_interruptions_say_how_to_resume_where_the_command_resumes() -> None:
    code, err = run(KeyboardInterrupt())
    assert code == 130 and err.strip() == "interrupted: rerun the same command to resume"
    code, err = run(KeyboardInterrupt(), "once")
    assert code == 130 and err.strip() == "interrupted"


def test_sigterm_ends_a_command_like_ctrl_c() -> None:
    before = signal.getsignal(signal.SIGTERM)
    code, err = run(None, "terminate")
    assert code == 143 and err.strip() == "interrupted"
    assert signal.getsignal(signal.SIGTERM) == before  # restored after the command


@pytest.mark.parametrize(("command", "code"), [("disguised", 143), ("disguised-int", 130)])
def test_an_interrupt_a_library_disguised_as_its_own_error_still_ends_as_interrupted(
        command: str, code: int) -> None:
    """CI saw SIGTERM during checkpoint reading reported as a corrupt tensor (exit 1)."""
    before = signal.getsignal(signal.SIGINT)
    assert run(None, command) == (code, "\ninterrupted\n")
    assert signal.getsignal(signal.SIGINT) == before
    assert run(MoEError("a real mistake"), "once")[0] == 1  # the signal is forgotten after


def test_an_option_that_does_not_parse_is_one_line_too() -> None:
    result = CliRunner().invoke(make_app(None), ["go", "--colour"])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "error: No such option: --colour (see moe-demo go --help)"]


def test_the_cli_framework_exits_pass_through() -> None:
    assert run(typer.Exit(3)) == (3, "")
    assert run(None)[0] == 0


def test_version_and_examples() -> None:
    app = make_app(None)
    assert CliRunner().invoke(app, ["--version"]).stdout == "moe-demo 9.9\n"
    assert "Examples:" in CliRunner().invoke(app, ["--help"]).stdout
