"""Multiple choice by log-likelihood: each choice is scored as the continuation of
`Question: <question>\nAnswer:`; the most likely one is the model's pick (`accuracy`), and
also the most likely per character of the choice (`accuracy_norm`, as lm-evaluation-harness's
`acc_norm`, which does not favour short choices).

Data: JSONL with `question`, `choices` (a list of strings, at least two) and `answer` (the
index of the right choice, or its text).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from moe_cap.accuracy_result import AccuracyResult
from moe_cap.errors import WorkloadError
from moe_cap.jsonl_records import read_jsonl_records

__all__ = ["ChoiceQuestion", "read_choice_questions", "score_choices"]

LogLikelihood = Callable[[str, str], float]


@dataclass(frozen=True)
class ChoiceQuestion:
    """A question with its choices and the index of the right one."""

    question: str
    choices: tuple[str, ...]
    answer: int

    @property
    def context(self) -> str:
        """What each choice continues."""
        return f"Question: {self.question}\nAnswer:"


def _question(data: object) -> ChoiceQuestion:
    if not isinstance(data, dict) or not isinstance(data.get("question"), str):
        raise WorkloadError("needs a string question")
    choices = data.get("choices")
    if not (isinstance(choices, list) and len(choices) >= 2
            and all(isinstance(c, str) and c for c in choices)):
        raise WorkloadError("choices must be a list of at least two non-empty strings")
    answer = data.get("answer")
    if isinstance(answer, str) and answer in choices:
        answer = choices.index(answer)
    if not (isinstance(answer, int) and not isinstance(answer, bool)
            and 0 <= answer < len(choices)):
        raise WorkloadError(f"answer must be a choice's index (0..{len(choices) - 1}) or its "
                            f"text, got {data.get('answer')!r}")
    return ChoiceQuestion(data["question"], tuple(choices), answer)


def read_choice_questions(path: str | Path) -> list[ChoiceQuestion]:
    """Every question of a JSONL file.

    Raises:
        WorkloadError: no such file, or bad lines (listed by number).
    """
    return read_jsonl_records(path, lambda data, number: _question(data), "data file",
                              "questions")


def score_choices(questions: Sequence[ChoiceQuestion], loglikelihood: LogLikelihood,
                  data: str) -> AccuracyResult:
    """Accuracy of picking the most likely choice (`loglikelihood(context, " " + choice)`)."""
    correct = correct_norm = 0
    for q in questions:
        scores = [loglikelihood(q.context, " " + c) for c in q.choices]
        normed = [s / len(" " + c) for s, c in zip(scores, q.choices, strict=True)]
        correct += max(range(len(scores)), key=scores.__getitem__) == q.answer
        correct_norm += max(range(len(normed)), key=normed.__getitem__) == q.answer
    n = len(questions)
    return AccuracyResult(task="choice", metric="accuracy", score=correct / n, num_examples=n,
                          details={"accuracy_norm": correct_norm / n, "correct": correct,
                                   "chance": sum(1 / len(q.choices) for q in questions) / n,
                                   "data": data})
