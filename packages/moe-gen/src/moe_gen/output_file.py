"""The output JSONL: one line per finished request, flushed as each finishes, so an interrupted
job loses nothing finished and a rerun resumes by skipping the ids already written.

The file is the job's alone while it runs: it is held under an exclusive lock (a second run on
it fails at once, naming the first), and an existing file is read as a moe-gen output before
anything is written: every line must be a result of ours, and a torn last line (a crash
mid-write) is cut off only if it is the start of one. A file moe-gen did not write is never
modified.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import TracebackType

from moe_core import OutputError, check_output_path, open_locked

from moe_gen.sequence import GenResult

__all__ = ["JobOutput"]

_WHAT = "--output"
_LINE_START = b'{"id": '  # every result line starts so (json.dumps of GenResult.to_dict)
_RESULT_KEYS = frozenset(("id", "text", "prompt_tokens", "completion_tokens", "finish_reason"))


def _is_result(line: str) -> bool:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return False
    return isinstance(record, dict) and record.keys() >= _RESULT_KEYS


def _is_torn_result(tail: bytes) -> bool:
    """Whether `tail` (a last line without its newline) is a result line cut short, or whole
    but for its newline. A complete JSON line that is not a result is someone else's."""
    text = tail.decode("utf-8", errors="replace")
    try:
        json.loads(text)
    except json.JSONDecodeError:
        return tail.startswith(_LINE_START) or _LINE_START.startswith(tail)
    return _is_result(text)


class JobOutput:
    """The job's output file, locked from opening to `close`.

    Attributes:
        path: The file.
        finished: Ids already in it (their requests are skipped).
        written: Results written by this run.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = check_output_path(path, _WHAT)
        existed = self.path.exists()
        fd = open_locked(self.path, _WHAT, os.O_RDWR | os.O_APPEND)
        self._created = not existed
        try:
            self.finished = self._resume(fd)
        except BaseException:
            os.close(fd)
            raise
        self._file = os.fdopen(fd, "a", encoding="utf-8")
        self.written = 0

    def _resume(self, fd: int) -> set[str]:
        """The ids in the file, once every line is known to be ours; cuts a torn last line."""
        with open(os.dup(fd), "rb") as f:
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        lines = complete.decode("utf-8", errors="replace").splitlines()
        foreign = [n for n, line in enumerate(lines, start=1)
                   if line.strip() and not _is_result(line)]
        torn = data[len(complete):]
        if torn and not _is_torn_result(torn):
            foreign.append(len(lines) + 1)
        if foreign:
            raise OutputError(f"{_WHAT} {self.path}: line {foreign[0]} is not a moe-gen result, "
                              "so the file is not a moe-gen output; it was left as it is "
                              "(choose another --output)")
        if torn:
            os.ftruncate(fd, len(complete))  # that request runs again (results are redone whole)
        return {str(json.loads(line)["id"]) for line in lines if line.strip()}

    def write(self, result: GenResult) -> None:
        """Write one result and flush it to the OS."""
        self._file.write(json.dumps(result.to_dict(), ensure_ascii=False) + "\n")
        self._file.flush()
        self.written += 1

    def close(self) -> None:
        """Unlock and close the file; remove it if this run created it and wrote nothing."""
        if self._file.closed:
            return
        mine = os.fstat(self._file.fileno())
        if self._created and self.written == 0 and mine.st_size == 0 and self.path.exists() \
                and os.path.samestat(mine, self.path.stat()):
            self.path.unlink()  # still locked: the empty file is the one this run created
        self._file.close()

    def __enter__(self) -> JobOutput:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()
