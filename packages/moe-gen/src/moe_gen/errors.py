"""The errors moe-gen raises for a user's mistake (the CLI prints them as one line)."""

from __future__ import annotations

from moe_core import MoEError

__all__ = ["InputError", "MoEGenError"]


class MoEGenError(MoEError):
    """Base of moe-gen's own user-facing errors."""


class InputError(MoEGenError, ValueError):
    """A missing requests file, or malformed, duplicate or unrunnable requests (the message lists
    them by line number)."""
