"""Output paths checked before the work that fills them, and small output files written whole.

A tool that fails to write its result after an hour of work has lost the hour: every output a
command will write is checked up front (not a folder, its folder exists, writable), and small
files (run records, reports) are written to a temporary name and renamed, so a reader never sees
half of one.
"""

from __future__ import annotations

import os
from pathlib import Path

from moe_core.errors import OutputError

__all__ = ["check_output_path", "write_output_text"]


def check_output_path(path: str | Path, what: str) -> Path:
    """`path`, once it is known that a file can be written there.

    Args:
        path: The output file.
        what: How the user named it (`"--output"`, `"the store file"`), for the message.

    Raises:
        OutputError: the path is a folder, its folder is missing, or it cannot be written.
    """
    path = Path(path)
    folder = path.parent
    if path.is_dir():
        raise OutputError(f"{what} {path}: is a folder; give a file name")
    if not folder.is_dir():
        reason = "does not exist" if not folder.exists() else "is not a folder"
        raise OutputError(f"{what} {path}: the folder {folder} {reason}")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"{what} {path}: the file is not writable")
    if not path.exists() and not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {path}: cannot create files in {folder}")
    return path


def write_output_text(path: str | Path, text: str, what: str) -> Path:
    """Write `text` to `path` whole: to `<path>.partial` first, then renamed over `path`.

    Raises:
        OutputError: the file cannot be written (the message names it and the reason).
    """
    path = check_output_path(path, what)
    partial = path.with_name(path.name + ".partial")
    try:
        partial.write_text(text, encoding="utf-8")
        partial.replace(path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise OutputError(f"{what} {path}: cannot write ({exc.strerror or exc})") from None
    return path
