"""The errors every tool of the workspace raises for a user's mistake.

`MoEError` is the one root: moe-core's errors and each tool's (`MoEGenError`, `MoEInfinityError`,
`MoECapError`) derive from it, and the command lines print any `MoEError` as one line and exit 1
(`moe_core.cli_errors`). Anything else that escapes a command is a bug and shows its traceback.
A message is one line in the user's words: it names the file, line, option or field at fault,
never an internal class.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DeviceError",
    "InputFileError",
    "MoECoreError",
    "MoEError",
    "OutputError",
    "OutputInUseError",
    "RequestError",
    "SettingError",
    "UnsupportedArchitectureError",
    "bad_lines_message",
]


class MoEError(Exception):
    """Root of every error that reports a user mistake, a bad input file or a missing resource."""


class SettingError(MoEError, ValueError):
    """An option, argument or config field out of range or malformed (the message names it)."""


class InputFileError(MoEError):
    """An input file or folder the user named is missing, unreadable or not of the right kind."""


class RequestError(MoEError, ValueError):
    """A prompt that cannot run: empty, or longer than the model's context allows."""


class DeviceError(MoEError):
    """The device asked for is not available on this machine."""


class OutputError(MoEError):
    """An output path that cannot be written, or an existing file that is not the tool's own."""


class OutputInUseError(OutputError):
    """Another process is writing the same output file."""


class MoECoreError(MoEError):
    """Base class of moe-core's errors about models: their folders, configs and weights."""


class ConfigError(MoECoreError, ValueError):
    """`config.json` is missing, unreadable, or lacks a field the architecture needs."""


class UnsupportedArchitectureError(MoECoreError, ValueError):
    """The checkpoint's architecture has no implementation here."""


class CheckpointError(MoECoreError):
    """A weight file is missing or truncated, or a tensor is absent or has the wrong shape."""


def bad_lines_message(source: str | Path, problems: Sequence[str], shown: int = 5) -> str:
    """One line listing the bad lines of an input file (`problems`, `"line N: ..."` each): the
    first `shown` quoted, the rest counted, so every mistake is reported at once."""
    listed = "; ".join(problems[:shown]) + (f"; and {len(problems) - shown} more"
                                            if len(problems) > shown else "")
    return f"{source}: {len(problems)} bad line(s): {listed}"
