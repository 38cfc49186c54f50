"""The README's Python blocks run as written (on the embedded tiny model, on the CPU): each
```python block is executed in order, in one namespace, as a reader would paste them."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """`(first line number, code)` of every ```python block of a Markdown text."""
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in _BLOCK.finditer(text)]


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny tensors: torch's thread pool only spin-waits on a busy 2-core runner."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_blocks_are_found_with_their_line_numbers() -> None:
    text = "intro\n```python\nx = 1\n```\n```\nshell\n```\n```python\ny = x\n```\n"
    assert python_blocks(text) == [(3, "x = 1\n"), (9, "y = x\n")]


def test_the_readme_python_blocks_run(one_thread: None, capsys: pytest.CaptureFixture[str]) -> None:
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    assert blocks, "the README has no ```python block"
    namespace: dict[str, object] = {"__name__": "__readme__"}
    for line, code in blocks:
        # Padded so that a traceback names the README's own line numbers.
        exec(compile("\n" * (line - 1) + code, str(README), "exec"), namespace)
    assert capsys.readouterr().out.strip()  # every block above prints what it shows
