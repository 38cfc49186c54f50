"""Reading requests: JSONL and plain text, every malformed or duplicate line reported by number."""

from __future__ import annotations

from pathlib import Path

import pytest
from moe_gen import GenRequest, InputError, read_requests


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_with_prompts_chats_and_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, '{"id": "a", "prompt": "hi"}\n\n'
                 '{"id": 7, "messages": [{"role": "user", "content": "yo"}], '
                 '"max_new_tokens": 5, "temperature": 0.7, "stop": "x"}\n')
    a, b = read_requests(path)
    assert a == GenRequest("a", prompt="hi")
    assert b.id == "7" and b.messages == ({"role": "user", "content": "yo"},)
    assert (b.max_new_tokens, b.temperature, b.stop) == (5, 0.7, ("x",))


def test_plain_text_is_one_prompt_per_line(tmp_path: Path) -> None:
    requests = read_requests(write(tmp_path, "first prompt\n\nsecond {prompt}\n"))
    assert [(r.id, r.prompt) for r in requests] == [("line-1", "first prompt"),
                                                    ("line-3", "second {prompt}")]


@pytest.mark.parametrize(("line", "message"), [
    ('{"id": "b", "prompt": 3}', "line 2: 'prompt' must be a string"),
    ('{"id": "b"}', "line 2: needs exactly one of 'prompt', 'messages' or 'token_ids'"),
    ('{"id": "b", "token_ids": []}', "line 2: 'token_ids' must be a non-empty list"),
    ('{"id": "b", "token_ids": [1, -2]}', "line 2: 'token_ids' must be a non-empty list"),
    ('{"id": "b", "token_ids": [1], "prompt": "x"}', "line 2: needs exactly one of"),
    ('{"id": "b", "prompt": "x", "colour": 1}', "line 2: unknown field(s) ['colour']"),
    ('{"id": "b", "prompt": "x"', "line 2: not valid JSON"),
    ('{"id": "a", "prompt": "again"}', "line 2: duplicate id 'a' (first on line 1)"),
    ('{"id": "b", "prompt": "x", "max_new_tokens": 0}', "line 2: request 'b': max_new_tokens"),
    ('{"id": "b", "messages": [{"role": "user"}]}', "line 2: 'messages' must be"),
])
def test_bad_lines_are_reported_by_number(tmp_path: Path, line: str, message: str) -> None:
    path = write(tmp_path, '{"id": "a", "prompt": "ok"}\n' + line + "\n")
    with pytest.raises(InputError, match="1 bad line") as info:
        read_requests(path)
    assert message in str(info.value)


def test_every_bad_line_is_listed(tmp_path: Path) -> None:
    path = write(tmp_path, '{"id": "a", "prompt": "ok"}\n{"id": "a", "prompt": "x"}\nnope\n')
    with pytest.raises(InputError, match="2 bad line") as info:
        read_requests(path)
    assert "line 2" in str(info.value) and "line 3" in str(info.value)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such input file"):
        read_requests(tmp_path / "nope.jsonl")
    with pytest.raises(InputError, match="empty"):
        read_requests(write(tmp_path, "\n\n"))
