"""The output JSONL: one line per finished request, flushed as each finishes, so an interrupted
job loses nothing finished and a rerun resumes by skipping the ids already written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TextIO

from moe_gen.sequence import GenResult

__all__ = ["ResultWriter", "finished_ids"]


def finished_ids(path: str | Path) -> set[str]:
    """Ids already in the output file; a torn last line (a crash mid-write) is cut off.

    Raises:
        ValueError: a complete line that is not an output record (not ours: refuse to append).
    """
    path = Path(path)
    if not path.is_file():
        return set()
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        path.write_bytes(complete)  # drop the torn tail; that request runs again
    ids = set()
    for number, line in enumerate(complete.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            ids.add(str(record["id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path}:{number}: not a moe-gen output line; refusing to resume "
                             "into it (choose another --output)") from None
    return ids


class ResultWriter:
    """Appends results to the output file, one flushed line each."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: TextIO = self.path.open("a", encoding="utf-8")
        self.written = 0

    def write(self, result: GenResult) -> None:
        """Write one result and flush it to the OS."""
        self._file.write(json.dumps(result.to_dict(), ensure_ascii=False) + "\n")
        self._file.flush()
        self.written += 1

    def close(self) -> None:
        """Close the file."""
        self._file.close()
