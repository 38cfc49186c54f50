"""How every command of the workspace's tools ends when it does not succeed.

One handler for all four command lines (`moe-core`, `moe-gen`, `moe-infinity`, `moe-cap`):

- a user's mistake (any `MoEError`) prints `error: <message>` as one line on stderr, exit 1;
  an option value the command line cannot parse (`--context -1`) likewise, exit 2;
- Ctrl-C (SIGINT) prints `interrupted` (with "rerun the same command to resume" where the
  command resumes), exit 130; SIGTERM likewise, exit 143, so `kill` and a batch scheduler's
  time limit leave the same tidy state as Ctrl-C;
- anything else is a bug: its traceback, then one line asking for a report, exit 1.

A `ValueError` or `OSError` that escapes is therefore shown as a bug, on purpose: user input is
validated into `MoEError`s, and a bare `ValueError` from deep inside would hide a real defect.
"""

from __future__ import annotations

import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

import typer
from rich.console import Console
from rich.text import Text

from moe_core.errors import MoEError

__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_TERMINATED", "Terminated", "print_error",
           "reported_errors"]

EXIT_ERROR = 1
EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_TERMINATED = 128 + signal.SIGTERM


class Terminated(BaseException):
    """Raised in the main thread when the process receives SIGTERM.

    A `BaseException`, like `KeyboardInterrupt`, so that `except Exception` in library code does
    not swallow it and `finally` blocks (closing and unlocking output files) still run.
    """


def _stderr() -> Console:
    # Made per call: a test runner may swap sys.stderr between commands.
    return Console(stderr=True, highlight=False, soft_wrap=True)


def print_error(message: str) -> None:
    """`error: <message>` on stderr, as one line (newlines inside the message become spaces)."""
    _stderr().print(Text("error: ", style="red") + Text(" ".join(message.split())))


class _Signals:
    """The interrupting signal the running command received, if any.

    An interrupt raised inside a C extension's callback (torch building a tensor while a
    checkpoint is read) can come back out as that extension's own error ("could not determine the
    shape of object type ..."), which a reader then reports as a corrupt file. Remembering the
    signal lets the command still end as interrupted, not as a user's or the file's fault.
    """

    received: signal.Signals | None = None


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    _Signals.received = signal.Signals(signum)
    raise KeyboardInterrupt if signum == signal.SIGINT else Terminated


@contextmanager
def _signals_raise() -> Iterator[None]:
    """Within the block, SIGINT raises `KeyboardInterrupt` and SIGTERM `Terminated` in the main
    thread, each remembered in `_Signals.received` (elsewhere: no change)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _Signals.received = None
    previous = {sig: signal.signal(sig, _raise_interrupt)
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _interrupted(resumable: Callable[[], bool], sig: signal.Signals) -> typer.Exit:
    hint = ": rerun the same command to resume" if resumable() else ""
    _stderr().print(Text(f"\ninterrupted{hint}", style="yellow"))
    return typer.Exit(EXIT_INTERRUPTED if sig == signal.SIGINT else EXIT_TERMINATED)


def _is_control_flow(exc: BaseException) -> bool:
    """The CLI framework's own exits (`typer.Exit`, usage errors, aborts) carry an exit code."""
    return isinstance(exc, typer.Exit | typer.Abort) or hasattr(exc, "exit_code")


def _usage_error_line(exc: BaseException) -> str | None:
    """A usage error's message with where to find help (None for other framework exits)."""
    format_message = getattr(exc, "format_message", None)
    if format_message is None or type(exc).__name__ == "NoArgsIsHelpError":  # that one is help
        return None
    ctx = getattr(exc, "ctx", None)
    return format_message() + (f" (see {ctx.command_path} --help)" if ctx is not None else "")


@contextmanager
def reported_errors(tool: str, resumable: Callable[[], bool] = lambda: False) -> Iterator[None]:
    """Run a command's body; end it as the module docstring says.

    Args:
        tool: The tool and its version (`"moe-gen 0.1.0"`), named in the bug report hint.
        resumable: Whether the running command resumes when rerun (asked only on interruption).

    Raises:
        typer.Exit: always, when the body raised (with the exit status above).
    """
    try:
        with _signals_raise():
            yield
    except (KeyboardInterrupt, Terminated) as exc:
        sig = signal.SIGINT if isinstance(exc, KeyboardInterrupt) else signal.SIGTERM
        raise _interrupted(resumable, sig) from None
    except MoEError as exc:
        if _Signals.received is not None:  # the error is the interrupt, disguised (see _Signals)
            raise _interrupted(resumable, _Signals.received) from None
        print_error(str(exc))
        raise typer.Exit(EXIT_ERROR) from None
    except Exception as exc:
        if _Signals.received is not None and not _is_control_flow(exc):
            raise _interrupted(resumable, _Signals.received) from None
        usage = _usage_error_line(exc) if _is_control_flow(exc) else None
        if usage is not None:
            print_error(usage)
            raise typer.Exit(int(exc.exit_code)) from None  # type: ignore[attr-defined]
        if _is_control_flow(exc):
            raise
        traceback.print_exc(file=sys.stderr)
        print_error(f"this is a bug in {tool}, not a mistake of yours: please report it with "
                    "the command you ran and the traceback above")
        raise typer.Exit(EXIT_ERROR) from None
