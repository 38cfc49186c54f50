"""Generation requests and how they are read from a JSONL or plain-text file.

A JSONL line is an object with an `id` and one of `prompt` (text), `messages` (a chat, rendered
with the model's template) or `token_ids` (the prompt's token ids, for models without a
tokenizer, e.g. shipped shapes run with `--dummy`); optional `max_new_tokens`, `temperature`,
`top_p`, `top_k`, `seed` and `stop` override the job's defaults. A file whose first non-blank
line is not a JSON object is plain text: one prompt per line, ids `line-<n>`. Every mistake
names its line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from moe_core import SamplingParams, bad_lines_message

from moe_gen.errors import InputError

__all__ = ["GenRequest", "InputError", "read_requests", "request_from_dict"]

_FIELDS = {"id", "prompt", "messages", "token_ids", "max_new_tokens", "temperature", "top_p",
           "top_k", "seed", "stop"}


@dataclass(frozen=True)
class GenRequest:
    """One prompt to complete.

    Attributes:
        id: Unique id, echoed in the output.
        prompt: Text prompt (tokenised as is), or None.
        messages: Chat messages (`{"role", "content"}`), rendered with the chat template.
        token_ids: Prompt token ids, or None.
        max_new_tokens: Limit for this request (None: the job's).
        temperature: Sampling temperature (None: the job's; 0 is greedy).
        top_p: Nucleus threshold (None: the job's).
        top_k: Top-k filter (None: the job's).
        seed: Sampling seed (None: derived from the job's seed and the request's position).
        stop: Stop strings: generation ends once the text contains one.
        line: Its line in the requests file (None for requests made in Python).
    """

    id: str
    prompt: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    token_ids: tuple[int, ...] | None = None
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = field(default=())
    line: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        """Raises `ValueError` naming the request and the field at fault."""
        given = sum(x is not None for x in (self.prompt, self.messages, self.token_ids))
        if given != 1:
            raise ValueError(f"request {self.id!r}: needs exactly one of prompt, messages or "
                             "token_ids")
        if self.token_ids is not None and not self.token_ids:
            raise ValueError(f"request {self.id!r}: token_ids is empty")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"request {self.id!r}: max_new_tokens must be >= 1, got "
                             f"{self.max_new_tokens}")
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError(f"request {self.id!r}: the prompt is empty")
        try:
            SamplingParams(temperature=self.temperature or 0.0, top_k=self.top_k, top_p=self.top_p)
        except ValueError as exc:
            raise ValueError(f"request {self.id!r}: {exc}") from None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return _is_int(value) or isinstance(value, float)


def _check_messages(value: object) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not value or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in value):
        raise ValueError("'messages' must be a non-empty list of {role, content} strings")
    return tuple({"role": m["role"], "content": m["content"]} for m in value)


def _check_token_ids(value: object) -> tuple[int, ...]:
    if not isinstance(value, list) or not value or not all(
            _is_int(t) and t >= 0 for t in value):
        raise ValueError("'token_ids' must be a non-empty list of non-negative integers")
    return tuple(value)


def request_from_dict(data: object, line: int | None = None) -> GenRequest:
    """A request from one parsed JSON line, or a row of a requests dataset on Ray (the same
    fields).

    Raises:
        ValueError: the field at fault, named.
    """
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}")
    rid = data.get("id")
    if not (isinstance(rid, str) and rid) and not _is_int(rid):
        raise ValueError("'id' must be a non-empty string or an integer")
    prompt = data.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError("'prompt' must be a string")
    messages = _check_messages(data["messages"]) if "messages" in data else None
    token_ids = _check_token_ids(data["token_ids"]) if "token_ids" in data else None
    if sum(x is not None for x in (prompt, messages, token_ids)) != 1:
        raise ValueError("needs exactly one of 'prompt', 'messages' or 'token_ids'")
    for key, ok in (("max_new_tokens", _is_int), ("top_k", _is_int), ("seed", _is_int),
                    ("temperature", _is_number), ("top_p", _is_number)):
        if data.get(key) is not None and not ok(data[key]):
            raise ValueError(f"'{key}' must be a number, got {data[key]!r}")
    stop = data.get("stop", [])
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ValueError("'stop' must be a string or a list of non-empty strings")
    return GenRequest(str(rid), prompt, messages, token_ids, data.get("max_new_tokens"),
                      data.get("temperature"), data.get("top_p"), data.get("top_k"),
                      data.get("seed"), tuple(stop), line)


def _is_jsonl(lines: list[str]) -> bool:
    first = next((line.strip() for line in lines if line.strip()), "")
    return first.startswith("{")


def read_requests(path: str | Path) -> list[GenRequest]:
    """Every request of a JSONL or plain-text file, in file order.

    Raises:
        InputError: no such file; malformed lines, values out of range (a negative temperature,
            an empty prompt) or ids seen before (the message lists them by line number;
            nothing is dropped silently).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such input file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text ({exc})") from None
    requests: list[GenRequest] = []
    problems: list[str] = []
    seen: dict[str, int] = {}
    jsonl = _is_jsonl(lines)
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            request = (request_from_dict(json.loads(line), number) if jsonl
                       else GenRequest(f"line-{number}", prompt=line, line=number))
        except json.JSONDecodeError as exc:
            problems.append(f"line {number}: not valid JSON ({exc.msg})")
            continue
        except ValueError as exc:
            problems.append(f"line {number}: {exc}")
            continue
        if request.id in seen:
            problems.append(f"line {number}: duplicate id {request.id!r} (first on line "
                            f"{seen[request.id]})")
            continue
        seen[request.id] = number
        requests.append(request)
    if problems:
        raise InputError(bad_lines_message(path, problems))
    if not requests:
        raise InputError(f"{path}: no requests (the file is empty)")
    return requests
