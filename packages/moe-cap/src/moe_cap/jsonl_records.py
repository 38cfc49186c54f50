"""Reading a JSONL file of records (workloads, math problems, multiple-choice questions): one
loop that skips blank lines, lists every bad line by number in one error, and refuses a file
without records.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from moe_core import bad_lines_message

from moe_cap.errors import WorkloadError

__all__ = ["read_jsonl_records"]

T = TypeVar("T")


def read_jsonl_records(path: str | Path, parse: Callable[[object, int], T], what: str,
                       noun: str) -> list[T]:
    """Every record of `path`, in file order.

    Args:
        path: The JSONL file.
        parse: Builds a record from one line's JSON value and its line number; raises
            `WorkloadError` (its message, prefixed with the line, joins the list) for a bad one.
        what: The file's kind in "no such <what>" (e.g. "workload file").
        noun: The records' name in "no <noun> in the file" (e.g. "requests").

    Raises:
        WorkloadError: no such file, not UTF-8, bad lines (all listed), or no records.
    """
    path = Path(path)
    if not path.is_file():
        raise WorkloadError(f"{path}: no such {what}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise WorkloadError(f"{path}: not UTF-8 text ({exc})") from None
    records: list[T] = []
    bad: list[str] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(parse(json.loads(line), number))
        except json.JSONDecodeError as exc:
            bad.append(f"line {number}: not valid JSON ({exc.msg})")
        except WorkloadError as exc:
            bad.append(f"line {number}: {exc}")
    if bad:
        raise WorkloadError(bad_lines_message(path, bad))
    if not records:
        raise WorkloadError(f"{path}: no {noun} in the file")
    return records
