"""Prompt files (JSONL) and the sample prompts shipped with the package.

One JSON object per line: `{"prompt": "raw text"}` or `{"messages": [{"role": "user",
"content": "..."}]}` (rendered with the model's chat template), with optional `"id"`,
`"domain"` (a label kept in the trace) and `"max_new_tokens"`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from moe_infinity.errors import MoEInfinityError

__all__ = ["Prompt", "read_prompts", "sample_prompts_path"]


@dataclass(frozen=True)
class Prompt:
    """One request to trace.

    Attributes:
        request_id: The line's `"id"`, else its 1-based line number.
        text: Raw prompt text (None for a chat prompt).
        messages: Chat turns (None for a raw prompt).
        domain: Optional label kept in the trace.
        max_new_tokens: Per-prompt limit, overriding the run's.
        line: Its line in the prompts file (None for prompts made in Python).
        token_ids: Its tokens, once checked against the model's context (`checked_prompts`).
    """

    request_id: str
    text: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None
    domain: str | None = None
    max_new_tokens: int | None = None
    line: int | None = field(default=None, compare=False)
    token_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if (self.text is None) == (self.messages is None):
            raise ValueError("Prompt needs exactly one of text and messages")
        if self.max_new_tokens is not None and self.max_new_tokens < 0:
            raise ValueError(f"Prompt.max_new_tokens must be >= 0, got {self.max_new_tokens}")


def sample_prompts_path() -> Path:
    """The shipped sample prompts: a few short ones per domain of the embedded tiny model."""
    return Path(str(resources.files("moe_infinity") / "data" / "sample_prompts.jsonl"))


def read_prompts(path: str | Path) -> list[Prompt]:
    """The prompts of a JSONL file (see the module docstring).

    Raises:
        MoEInfinityError: a missing file, a line that is not a JSON object of the right form,
            or no prompts at all.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise MoEInfinityError(f"{path}: cannot read ({exc.strerror or exc})") from None
    prompts = [_prompt(path, n, line) for n, line in enumerate(lines, 1) if line.strip()]
    if not prompts:
        raise MoEInfinityError(f"{path}: no prompts")
    return prompts


def _prompt(path: Path, number: int, line: str) -> Prompt:
    where = f"{path}:{number}"
    try:
        item = json.loads(line)
    except json.JSONDecodeError as exc:
        raise MoEInfinityError(f"{where}: not JSON ({exc.msg})") from None
    if not isinstance(item, dict):
        raise MoEInfinityError(f"{where}: expected a JSON object")
    messages = item.get("messages")
    if messages is not None:
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in messages) or not messages:
            raise MoEInfinityError(f"{where}: 'messages' must be a non-empty list of "
                                   "{role, content} strings")
        messages = tuple((m["role"], m["content"]) for m in messages)
    text = item.get("prompt")
    if (text is None) == (messages is None) or (text is not None and not isinstance(text, str)):
        raise MoEInfinityError(f"{where}: give exactly one of 'prompt' (a string) and 'messages'")
    if text is not None and not text.strip():
        raise MoEInfinityError(f"{where}: empty prompt")
    limit = item.get("max_new_tokens")
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise MoEInfinityError(f"{where}: 'max_new_tokens' must be a non-negative integer")
    domain = item.get("domain")
    return Prompt(str(item.get("id", number)), text, messages,
                  None if domain is None else str(domain), limit, number)
