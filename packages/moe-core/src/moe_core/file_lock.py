"""Exclusive locks on the files a tool writes, so two runs never write the same file at once.

The lock is the operating system's (`flock`): it belongs to the open file and dies with the
process, so a run killed by any signal leaves no stale lock behind. A second run on the same file
fails at once with one line naming the holder's process id (read from `/proc/locks` on Linux;
elsewhere the message goes without it). Where `fcntl` is missing (Windows) files are not locked.
"""

from __future__ import annotations

import os
from pathlib import Path

from moe_core.errors import OutputError, OutputInUseError

try:
    import fcntl
except ImportError:  # pragma: no cover (Windows)
    fcntl = None  # type: ignore[assignment]

__all__ = ["lock_holder", "open_locked"]

_PROC_LOCKS = Path("/proc/locks")


def lock_holder(path: str | Path) -> int | None:
    """The id of a process holding an `flock` on `path`, if the system says (Linux), else None."""
    try:
        st = os.stat(path)
        table = _PROC_LOCKS.read_text()
    except OSError:
        return None
    # A line: "1: FLOCK  ADVISORY  WRITE 4242 fd:01:1234567 0 EOF" (device major:minor in hex).
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in table.splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == where:
            return int(fields[4]) if fields[4].isdigit() else None
    return None


def open_locked(path: str | Path, what: str, flags: int = os.O_RDWR) -> int:
    """A file descriptor of `path` (created if missing, never truncated) under an exclusive lock.

    Args:
        path: The file.
        what: How the user named it (`"--output"`), for the messages.
        flags: Open flags besides `O_CREAT` (e.g. `os.O_RDWR | os.O_APPEND`).

    Raises:
        OutputInUseError: another process holds the lock.
        OutputError: the file cannot be opened.
    """
    path = Path(path)
    while True:
        try:
            fd = os.open(path, flags | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(f"{what} {path}: cannot open ({exc.strerror or exc})") from None
        if fcntl is None:  # pragma: no cover
            return fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = lock_holder(path)
            by = f"another process (pid {holder})" if holder else "another process"
            raise OutputInUseError(f"{what} {path}: being written by {by}; wait for it to "
                                   "finish or choose another file") from None
        # The holder we waited on may have renamed or removed the file meanwhile: then the lock
        # is on a file no longer at `path`, so open the path again.
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
