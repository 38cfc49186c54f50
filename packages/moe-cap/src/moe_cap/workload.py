"""Workloads: the requests `moe-cap run` sends. A JSONL file of prompts, or a synthetic spec.

A JSONL line is an object with `prompt` (text, sent to a completions endpoint) or `messages`
(a chat, `[{"role", "content"}]`), an optional `id` (default `line-<n>`) and an optional
`max_tokens`. Every bad line is reported at once, by number, before anything is sent.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from moe_cap.errors import WorkloadError
from moe_cap.jsonl_records import read_jsonl_records
from moe_cap.length_distribution import LengthDistribution

__all__ = ["SYNTHETIC_WORDS", "SyntheticSpec", "WorkItem", "read_workload", "synthetic_workload"]

_FIELDS = {"id", "prompt", "messages", "max_tokens"}
# Short common English words: one token each in the BPE vocabularies of the models we compare,
# so a synthetic prompt of N words is close to N tokens on every target (the dummy GGUF of
# benchmarks/dummy_gguf.py gives each of them one token, with and without a leading space).
SYNTHETIC_WORDS = ("the", "of", "and", "to", "in", "is", "was", "for", "on", "with", "as", "at",
                   "by", "from", "or", "an", "be", "this", "that", "which", "one", "all", "were",
                   "when", "we", "there", "can", "had", "has", "more", "time", "day", "man", "new",
                   "old", "way", "long", "little", "world", "house", "water", "light", "night",
                   "city", "word", "hand")


@dataclass(frozen=True)
class WorkItem:
    """One request of a workload.

    Attributes:
        id: Unique within the workload.
        prompt: Text prompt (completions), or None.
        messages: Chat messages (chat completions), or None.
        max_tokens: Output token limit (None: the run's default).
        ignore_eos: Ask the target to generate exactly `max_tokens` (synthetic workloads).
        reference: The expected answer, for accuracy tasks (not sent).
    """

    id: str
    prompt: str | None = None
    messages: tuple[dict[str, str], ...] | None = None
    max_tokens: int | None = None
    ignore_eos: bool = False
    reference: str | None = None

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise WorkloadError(f"request {self.id!r}: needs exactly one of prompt or messages")
        if self.prompt is not None and not self.prompt:
            raise WorkloadError(f"request {self.id!r}: the prompt is empty")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise WorkloadError(f"request {self.id!r}: max_tokens must be >= 1, got "
                                f"{self.max_tokens}")


def _messages(value: object) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise WorkloadError("messages must be a non-empty list of {role, content} objects")
    out = []
    for m in value:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)):
            raise WorkloadError("each message needs string role and content")
        out.append({"role": m["role"], "content": m["content"]})
    return tuple(out)


def _item(data: object, number: int) -> WorkItem:
    if not isinstance(data, dict):
        raise WorkloadError("must be a JSON object")
    unknown = set(data) - _FIELDS
    if unknown:
        raise WorkloadError(f"unknown field(s) {sorted(unknown)} (known: {sorted(_FIELDS)})")
    prompt, max_tokens = data.get("prompt"), data.get("max_tokens")
    if prompt is not None and not isinstance(prompt, str):
        raise WorkloadError("prompt must be a string")
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool)):
        raise WorkloadError(f"max_tokens must be an integer, got {max_tokens!r}")
    messages = data.get("messages")
    return WorkItem(str(data.get("id", f"line-{number}")), prompt=prompt,
                    messages=None if messages is None else _messages(messages),
                    max_tokens=max_tokens)


def read_workload(path: str | Path) -> list[WorkItem]:
    """Every request of a JSONL workload, in file order.

    Raises:
        WorkloadError: no such file, not UTF-8, no requests, or bad lines (all listed by line
            number: not JSON, a missing or wrong field, a repeated id).
    """
    seen: dict[str, int] = {}

    def item(data: object, number: int) -> WorkItem:
        parsed = _item(data, number)
        if parsed.id in seen:
            raise WorkloadError(f"id {parsed.id!r} already used on line {seen[parsed.id]}")
        seen[parsed.id] = number
        return parsed

    return read_jsonl_records(path, item, "workload file", "requests")


@dataclass(frozen=True)
class SyntheticSpec:
    """Random prompts of given lengths.

    Attributes:
        num_requests: Requests to make.
        input_tokens: Prompt length in words (about one token each).
        output_tokens: Output length; each request asks for exactly that many (`ignore_eos`).
        seed: Seed of the lengths and the words.
    """

    num_requests: int
    input_tokens: LengthDistribution
    output_tokens: LengthDistribution
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_requests < 1:
            raise WorkloadError(f"the synthetic workload needs >= 1 request, got "
                                f"{self.num_requests}")


def synthetic_workload(spec: SyntheticSpec) -> list[WorkItem]:
    """`spec.num_requests` prompts of random common words, lengths drawn from `spec`."""
    rng = random.Random(spec.seed)
    items = []
    for i in range(spec.num_requests):
        n_in = spec.input_tokens.draw(rng)
        words = " ".join(rng.choice(SYNTHETIC_WORDS) for _ in range(n_in))
        items.append(WorkItem(f"synthetic-{i}", prompt=words,
                              max_tokens=spec.output_tokens.draw(rng), ignore_eos=True))
    return items
