"""Output files: checked before the work, locked while written (a second writer fails at once,
naming the first), staged beside their final name and never left half-written."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from moe_core import (
    OutputError,
    OutputInUseError,
    StagedOutput,
    check_output_path,
    lock_holder,
    open_locked,
    write_output_text,
)


@pytest.mark.parametrize(("name", "message"), [
    ("folder", "is a folder"),
    ("missing/out.bin", "the folder missing does not exist"),
    ("plain.txt/out.bin", "is not a folder"),
])
def test_unwritable_paths_are_refused_up_front(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               name: str, message: str) -> None:
    monkeypatch.chdir(tmp_path)
    Path("folder").mkdir()
    Path("plain.txt").write_text("mine")
    with pytest.raises(OutputError, match=f"^--output {name}: .*{message}"):
        check_output_path(name, "--output")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "plain.txt"]


def test_a_second_writer_is_refused_naming_the_first(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    fd = open_locked(path, "--output")
    try:
        assert lock_holder(path) == os.getpid()
        with pytest.raises(OutputInUseError, match=rf"--output .*pid {os.getpid()}"):
            open_locked(path, "--output")
    finally:
        os.close(fd)
    os.close(open_locked(path, "--output"))  # the lock died with its file descriptor


def test_a_staged_output_appears_only_when_complete(tmp_path: Path) -> None:
    path = tmp_path / "traces.bin"
    path.write_bytes(b"previous")
    with pytest.raises(KeyboardInterrupt), StagedOutput(path, "--output") as staged:
        staged.partial.write_bytes(b"half")
        raise KeyboardInterrupt
    assert path.read_bytes() == b"previous" and not staged.partial.exists()
    with StagedOutput(path, "--output") as staged:
        staged.partial.write_bytes(b"whole")
        assert path.read_bytes() == b"previous"
    assert path.read_bytes() == b"whole" and not staged.partial.exists()


def test_a_staged_output_is_locked_while_written(tmp_path: Path) -> None:
    with StagedOutput(tmp_path / "experts.moepack", "store file"), \
            pytest.raises(OutputInUseError, match="store file"), \
            StagedOutput(tmp_path / "experts.moepack", "store file"):
        pass


def test_small_outputs_are_written_whole(tmp_path: Path) -> None:
    path = write_output_text(tmp_path / "record.json", "{}\n", "--json")
    assert path.read_text() == "{}\n" and sorted(p.name for p in tmp_path.iterdir()) == [
        "record.json"]
    with pytest.raises(OutputError, match="--json"):
        write_output_text(tmp_path / "nowhere" / "record.json", "{}\n", "--json")
