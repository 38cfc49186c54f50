"""The run record's `accuracy` section: one task's score and how it was obtained."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from moe_cap.errors import RunRecordError

__all__ = ["AccuracyResult"]


@dataclass(frozen=True, kw_only=True)
class AccuracyResult:
    """A task's score.

    Attributes:
        task: `"gsm8k"`, `"perplexity"`, `"choice"` or an lm-eval task name.
        metric: What `score` is (`"exact_match"`, `"perplexity"`, `"accuracy"`).
        score: The value (exact match and accuracy in [0, 1]; perplexity >= 1).
        num_examples: Problems (or tokens, for perplexity) scored.
        higher_is_better: Whether a larger score is better (False for perplexity).
        details: Settings and side figures (data file, shots, prompt style, loss in nats).
    """

    task: str
    metric: str
    score: float
    num_examples: int
    higher_is_better: bool = True
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"task": self.task, "metric": self.metric, "score": self.score,
                "num_examples": self.num_examples, "higher_is_better": self.higher_is_better,
                "details": self.details}

    @classmethod
    def from_dict(cls, data: object, where: str = "accuracy") -> AccuracyResult:
        """Read `to_dict`'s form; errors name the field."""
        if not isinstance(data, Mapping):
            raise RunRecordError(f"{where} must be an object")
        unknown = set(data) - {"task", "metric", "score", "num_examples", "higher_is_better",
                               "details"}
        if unknown:
            raise RunRecordError(f"{where} has unknown field(s) {sorted(unknown)}")
        try:
            return cls(task=str(data["task"]), metric=str(data["metric"]),
                       score=float(data["score"]), num_examples=int(data["num_examples"]),
                       higher_is_better=bool(data.get("higher_is_better", True)),
                       details=dict(data.get("details", {})))
        except KeyError as exc:
            raise RunRecordError(f"{where}.{exc.args[0]} is missing") from None
        except (TypeError, ValueError) as exc:
            raise RunRecordError(f"{where}: {exc}") from None
