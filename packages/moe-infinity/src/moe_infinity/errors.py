"""The errors moe-infinity raises for user mistakes (the CLI prints them as one line)."""

from __future__ import annotations

from moe_core import MoEError

__all__ = ["MoEInfinityError", "TraceFileError"]


class MoEInfinityError(MoEError):
    """Base of moe-infinity's user-facing errors."""


class TraceFileError(MoEInfinityError):
    """A trace or collection file is missing, corrupt, of another version, or for another model."""
