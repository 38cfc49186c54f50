"""The job's output file: a file moe-gen did not write is never modified, a torn last line of
its own is cut (that request runs again), and only one run writes it at a time."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from moe_core import OutputError, OutputInUseError
from moe_gen.output_file import JobOutput
from moe_gen.sequence import GenResult


def result_line(rid: str) -> bytes:
    return (json.dumps(GenResult(rid, 0, "text", (1, 2), 3, "eos").to_dict()) + "\n").encode()


# (is it moe-gen's, the line)
ours = st.builds(result_line, st.text(min_size=1, max_size=5)).map(lambda line: (True, line))
theirs = st.sampled_from([b"my notes\n", b'{"id": 5, "note": "mine"}\n', b"[1, 2]\n", b"\xff\n",
                          b'{"id": "x", "text": "no counts"}\n']).map(lambda line: (False, line))
tails = st.sampled_from([(True, b""), (True, b'{"id": "torn'), (True, b'{"i'),
                         (True, result_line("whole")[:-1]), (False, b'{"id": 5, "note": "mine"}'),
                         (False, b"last line")])


@given(st.lists(st.one_of(ours, theirs), max_size=6), tails)
def test_a_file_is_used_only_if_every_line_is_ours(tagged: list[tuple[bool, bytes]],
                                                   tail: tuple[bool, bytes]) -> None:
    lines = [line for _, line in tagged]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "out.jsonl"
        content = b"".join(lines) + tail[1]
        path.write_bytes(content)
        foreign = not all(mine for mine, _ in [*tagged, tail])
        try:
            with JobOutput(path) as output:
                assert not foreign
                finished = output.finished
        except OutputError as exc:
            assert foreign, exc
            assert path.read_bytes() == content  # not one byte changed
            return
        complete = b"".join(lines)
        assert path.read_bytes() == complete  # only our own torn tail is cut
        assert finished == {json.loads(line)["id"] for line in lines}


def test_a_new_output_left_empty_is_removed(tmp_path: Path) -> None:
    with JobOutput(tmp_path / "out.jsonl"):
        pass
    assert not (tmp_path / "out.jsonl").exists()


def test_one_run_at_a_time(tmp_path: Path) -> None:
    with JobOutput(tmp_path / "out.jsonl") as first:
        first.write(GenResult("a", 0, "x", (1,), 1, "length"))
        with pytest.raises(OutputInUseError, match=rf"pid {os.getpid()}"):
            JobOutput(tmp_path / "out.jsonl")
    with JobOutput(tmp_path / "out.jsonl") as again:
        assert again.finished == {"a"}
