"""The per-request rows of a run, one JSON object a line, each written and flushed as its
request ends, so an interrupted run keeps every row measured until then."""

from __future__ import annotations

import json
from pathlib import Path
from types import TracebackType
from typing import TextIO

from moe_core import OutputError, check_output_path

from moe_cap.request_result import RequestResult

__all__ = ["RowsFile", "rows_path_for"]


def rows_path_for(record_path: Path) -> Path:
    """`run.json` -> `run.requests.jsonl` beside it."""
    return record_path.with_name(record_path.name.removesuffix(".json") + ".requests.jsonl")


class RowsFile:
    """`with RowsFile(path) as rows: rows.write(result)` (the file is replaced, not appended)."""

    def __init__(self, path: Path) -> None:
        self.path = check_output_path(path, "the requests file")
        self._file: TextIO | None = None

    def __enter__(self) -> RowsFile:
        try:
            self._file = self.path.open("w", encoding="utf-8")
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot write the requests file ({exc})") from None
        return self

    def write(self, row: RequestResult) -> None:
        """Append one row and flush it."""
        assert self._file is not None
        self._file.write(json.dumps(row.to_dict()) + "\n")
        self._file.flush()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._file is not None:
            self._file.close()
