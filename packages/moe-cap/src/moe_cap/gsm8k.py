"""GSM8K-style math (Cobbe et al. 2021, arXiv:2110.14168): k-shot prompts, and exact match of the
final number of the answer against the reference after `####`.

The final number of a generated answer is, in order: the number after the first `####`, the
number after the first "the answer is", else the last number in the text (commas between
digit groups and a leading `$` dropped). Two numbers match when they are equal as decimals
(`18`, `18.0` and `18.00` match; `1,234` is `1234`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Literal

from moe_cap.accuracy_result import AccuracyResult
from moe_cap.errors import WorkloadError
from moe_cap.jsonl_records import read_jsonl_records
from moe_cap.request_result import RequestResult
from moe_cap.workload import WorkItem

__all__ = ["MathProblem", "PromptStyle", "answers_match", "extract_final_number",
           "gsm8k_items", "read_math_problems", "score_gsm8k"]

PromptStyle = Literal["chat", "completion"]
_NUMBER = r"-?\$?\s*\d[\d,]*(?:\.\d+)?|-?\$?\s*\.\d+"
_MARKED = re.compile(r"####\s*(" + _NUMBER + ")")
_SAID = re.compile(r"answer is[:\s]*\$?\s*(" + _NUMBER + ")", re.IGNORECASE)
# A bare number must not be the tail of a word ("t3", "x2"); after "####" anything goes.
_ANY = re.compile(r"(?<![A-Za-z_])(?:" + _NUMBER + ")")
# A completion-style answer runs on into the next made-up question: cut it there.
_NEXT_QUESTION = re.compile(r"\n\s*Question:")


@dataclass(frozen=True)
class MathProblem:
    """A GSM8K problem.

    Attributes:
        question: The word problem.
        answer: The worked solution ending in `#### <number>`.
    """

    question: str
    answer: str

    @property
    def final(self) -> str:
        """The reference number (after `####`)."""
        number = extract_final_number(self.answer)
        assert number is not None  # checked when read
        return number


def _normalise(raw: str) -> str | None:
    text = raw.replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        value = Decimal(text)
    except InvalidOperation:
        return None
    value = value.normalize()
    if value == value.to_integral_value():
        value = value.quantize(Decimal(1))
    return format(value, "f")


def extract_final_number(text: str) -> str | None:
    """The final number of an answer, normalised (`"1,234.50"` -> `"1234.5"`), or None."""
    text = _NEXT_QUESTION.split(text, maxsplit=1)[0]
    for pattern in (_MARKED, _SAID):
        match = pattern.search(text)
        if match is not None:
            return _normalise(match.group(1))
    numbers = _ANY.findall(text)
    return _normalise(numbers[-1]) if numbers else None


def answers_match(generated: str, reference: str) -> bool:
    """Whether the final number of `generated` equals the number `reference` names."""
    got, want = extract_final_number(generated), extract_final_number(reference)
    return got is not None and want is not None and Decimal(got) == Decimal(want)


def read_math_problems(path: str | Path) -> list[MathProblem]:
    """GSM8K JSONL: `{"question": ..., "answer": "... #### N"}` per line.

    Raises:
        WorkloadError: no such file, or bad lines (listed by number).
    """
    return read_jsonl_records(path, _problem, "data file", "problems")


def _problem(data: object, number: int) -> MathProblem:
    if not (isinstance(data, dict) and isinstance(data.get("question"), str)
            and isinstance(data.get("answer"), str)):
        raise WorkloadError("needs string question and answer")
    if extract_final_number(data["answer"].split("####")[-1]) is None \
            or "####" not in data["answer"]:
        raise WorkloadError("the answer has no final number after ####")
    return MathProblem(data["question"], data["answer"])


def _clean(solution: str) -> str:
    """A worked solution without GSM8K's `<<calculator>>` annotations."""
    return re.sub(r"<<[^>]*>>", "", solution)


def gsm8k_items(problems: Sequence[MathProblem], shots: Sequence[MathProblem] = (),
                style: PromptStyle = "chat", max_tokens: int = 256) -> list[WorkItem]:
    """One request per problem, each preceded by the `shots` worked examples."""
    items = []
    for i, problem in enumerate(problems):
        if style == "chat":
            messages: list[dict[str, str]] = []
            for shot in shots:
                messages += [{"role": "user", "content": shot.question},
                             {"role": "assistant", "content": _clean(shot.answer)}]
            messages.append({"role": "user", "content": problem.question})
            items.append(WorkItem(f"gsm8k-{i}", messages=tuple(messages), max_tokens=max_tokens,
                                  reference=problem.final))
        else:
            context = "".join(f"Question: {s.question}\nAnswer: {_clean(s.answer)}\n\n"
                              for s in shots)
            items.append(WorkItem(f"gsm8k-{i}", prompt=f"{context}Question: {problem.question}"
                                  f"\nAnswer:", max_tokens=max_tokens, reference=problem.final))
    return items


def score_gsm8k(items: Sequence[WorkItem], rows: Sequence[RequestResult], *, shots: int,
                style: PromptStyle, data: str) -> AccuracyResult:
    """Exact match over the requests (a failed request scores 0)."""
    by_index = {r.index: r for r in rows}
    correct = 0
    for i, item in enumerate(items):
        row = by_index.get(i)
        if row is not None and row.ok and item.reference is not None:
            correct += answers_match(row.text or "", item.reference)
    return AccuracyResult(task="gsm8k", metric="exact_match", score=correct / len(items),
                          num_examples=len(items),
                          details={"correct": correct, "shots": shots, "prompt_style": style,
                                   "data": data})
