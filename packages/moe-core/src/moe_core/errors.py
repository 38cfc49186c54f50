"""The errors moe-core raises for bad user input.

Each carries one line that names the file, tensor or field at fault, so a CLI can print it as is
and exit non-zero instead of showing a traceback.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "MoECoreError",
    "UnsupportedArchitectureError",
]


class MoECoreError(Exception):
    """Base class of every error that reports a user mistake or a bad model folder."""


class ConfigError(MoECoreError, ValueError):
    """`config.json` is missing, unreadable, or lacks a field the architecture needs."""


class UnsupportedArchitectureError(MoECoreError, ValueError):
    """The checkpoint's architecture has no implementation here."""


class CheckpointError(MoECoreError):
    """A weight file is missing or truncated, or a tensor is absent or has the wrong shape."""
