"""A whole-file output (a store file, a trace file) staged beside its final name while it is made.

The file is written to `<path>.partial` and renamed over `path` only once complete, so `path`
never holds half a file; the partial file is locked from before the work starts until the
rename, so a second run writing the same output fails at once (`moe_core.file_lock`), and it is
removed when the work fails or is interrupted.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType

from moe_core.errors import OutputError
from moe_core.file_lock import open_locked
from moe_core.output_path import check_output_path

__all__ = ["StagedOutput", "partial_path"]


def partial_path(path: str | Path) -> Path:
    """Where the output `path` is staged while it is written: `<path>.partial`."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


class StagedOutput:
    """`with StagedOutput(path, what) as staged:` write the file `staged.partial`.

    Entering checks `path` (`check_output_path`) and locks the partial file; leaving the block
    normally renames it over `path` (unless the writer already did: `write_packed` does), leaving
    it by an exception (an error, Ctrl-C) removes it.

    Attributes:
        path: The final output file.
        partial: The staged file, `<path>.partial`.
    """

    def __init__(self, path: str | Path, what: str) -> None:
        self.path = check_output_path(path, what)
        self.partial = partial_path(self.path)
        self._what = what
        self._fd: int | None = None

    def __enter__(self) -> StagedOutput:
        self._fd = open_locked(self.partial, self._what, os.O_WRONLY)
        return self

    def _commit(self) -> None:
        try:
            if self._holds_partial():
                self.partial.replace(self.path)
        except OSError as exc:
            raise OutputError(f"{self._what} {self.path}: cannot write ({exc.strerror or exc})"
                              ) from None
        finally:
            self._release()

    def _holds_partial(self) -> bool:
        """Whether `partial` is still our locked file (a writer may have renamed it into place,
        and another run may have staged a new one since)."""
        assert self._fd is not None
        try:
            return os.path.samestat(os.fstat(self._fd), os.stat(self.partial))
        except FileNotFoundError:
            return False

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self._fd is None:
            return
        if kind is None:
            self._commit()
            return
        if self._holds_partial():
            self.partial.unlink()
        self._release()

    def _release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
