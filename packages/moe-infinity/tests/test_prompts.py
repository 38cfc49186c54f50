"""Prompt files: both forms read, every malformed line is named."""

from __future__ import annotations

from pathlib import Path

import pytest
from moe_infinity import MoEInfinityError, read_prompts, sample_prompts_path


def test_shipped_samples_cover_every_domain() -> None:
    prompts = read_prompts(sample_prompts_path())
    domains = [p.domain for p in prompts]
    assert set(domains) == {"stories", "math", "plays", "de", "fr", "es", "code"}
    assert all(domains.count(d) >= 3 for d in set(domains))
    assert any(p.messages for p in prompts) and any(p.text for p in prompts)


def test_both_forms(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hi"}\n\n{"id": "x", "domain": "math", "max_new_tokens": 3, '
                    '"messages": [{"role": "user", "content": "2+2?"}]}\n')
    first, second = read_prompts(path)
    assert (first.request_id, first.text, first.messages) == ("1", "hi", None)
    assert second.request_id == "x" and second.messages == (("user", "2+2?"),)
    assert second.max_new_tokens == 3 and second.domain == "math"


@pytest.mark.parametrize(("line", "message"), [
    ("not json", "not JSON"), ("[1]", "JSON object"), ('{"id": 1}', "exactly one"),
    ('{"prompt": "a", "messages": [{"role": "u", "content": "c"}]}', "exactly one"),
    ('{"messages": []}', "non-empty list"), ('{"prompt": 3}', "exactly one"),
    ('{"prompt": "a", "max_new_tokens": -1}', "non-negative"), ('{"prompt": " "}', "empty"),
])
def test_bad_lines_are_named(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ok"}\n' + line + "\n")
    with pytest.raises(MoEInfinityError, match=f"p.jsonl:2: .*{message}"):
        read_prompts(path)


def test_empty_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(MoEInfinityError, match="no prompts"):
        read_prompts(tmp_path / "e.jsonl")
    with pytest.raises(MoEInfinityError, match="cannot read"):
        read_prompts(tmp_path / "missing.jsonl")
