"""The commit a benchmark record names: `git rev-parse --short HEAD` where the run happens.

A device copy's git metadata can lag its working tree (the lent GPU machine's did), so scripts
that take `--commit` prefer it; records also keep a `commit_note` where it was corrected.
"""

from __future__ import annotations

import subprocess

__all__ = ["commit"]


def commit() -> str:
    """The short hash of HEAD, or "unknown" outside a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
