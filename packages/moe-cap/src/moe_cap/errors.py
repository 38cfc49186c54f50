"""The errors moe-cap raises for user mistakes: one line each, naming the field or file at fault,
so the CLI prints them as they are and exits 1 instead of showing a traceback."""

from __future__ import annotations

from moe_core import MoEError

__all__ = ["HardwareError", "MoECapError", "RunRecordError", "TargetError", "WorkloadError"]


class MoECapError(MoEError, ValueError):
    """Base class of every error that reports a user mistake."""


class HardwareError(MoECapError):
    """A GPU or CPU the hardware table does not know, or a bad hardware override file."""


class RunRecordError(MoECapError):
    """A run record that is unreadable, or whose fields are missing or out of range."""


class WorkloadError(MoECapError):
    """A workload, task data file or load setting that cannot be run (bad lines by number)."""


class TargetError(MoECapError):
    """A target that cannot be reached or used: an unreachable URL, an engine not installed."""
