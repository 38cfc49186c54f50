"""What the CAP report shows, computed from run records: one point per run, grouped by system,
with the three CAP axes normalised so that the best system scores 1 on each."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from moe_cap.run_view import RunView

__all__ = ["CapScores", "SystemRuns", "cap_scores", "group_systems", "load_label"]


def load_label(view: RunView) -> str:
    """`c4` (closed loop, concurrency 4), `r2` (open loop, 2 req/s), `offline` or `score`."""
    serving = view.record.serving
    if serving is None:
        return "score"
    if serving.target_kind == "offline":
        return "offline"
    load = serving.load
    return f"c{load['concurrency']}" if load.get("mode") == "closed" \
        else f"r{load['rate_per_s']:g}"


@dataclass
class SystemRuns:
    """The runs of one system (same engine label)."""

    name: str
    views: list[RunView] = field(default_factory=list)

    @property
    def serving_views(self) -> list[RunView]:
        """Runs with client measurements, in load order (concurrency or rate)."""
        def order(v: RunView) -> float:
            load = v.record.serving.load if v.record.serving else {}
            return float(load.get("concurrency") or load.get("rate_per_s") or 0)
        return sorted((v for v in self.views if v.record.serving is not None), key=order)


def group_systems(views: list[RunView]) -> list[SystemRuns]:
    """Runs grouped by system, in first-seen order."""
    systems: dict[str, SystemRuns] = {}
    for view in views:
        systems.setdefault(view.name, SystemRuns(view.name)).views.append(view)
    return list(systems.values())


@dataclass(frozen=True)
class CapScores:
    """A system's raw figures and its normalised CAP axes (1 = the best system; 0 = none).

    Attributes:
        name: The system.
        usd_per_million_output: Its cheapest run's $ per 1M output tokens (None: not priced).
        accuracy: Its score on the shared task (None: not measured).
        output_tokens_per_s: Its fastest run's output tokens per second.
        cost_axis, accuracy_axis, performance_axis: Normalised in [0, 1].
    """

    name: str
    usd_per_million_output: float | None
    accuracy: float | None
    output_tokens_per_s: float | None
    cost_axis: float
    accuracy_axis: float
    performance_axis: float


def _shared_task(systems: list[SystemRuns]) -> tuple[str, bool] | None:
    """The accuracy task most systems report, and whether higher is better."""
    tasks: Counter[tuple[str, bool]] = Counter()
    for system in systems:
        seen = {(v.record.accuracy.task, v.record.accuracy.higher_is_better)
                for v in system.views if v.record.accuracy is not None}
        tasks.update(seen)
    return tasks.most_common(1)[0][0] if tasks else None


def cap_scores(systems: list[SystemRuns]) -> tuple[list[CapScores], str | None]:
    """Each system's CAP figures and axes, and the accuracy task used (None: none measured)."""
    task = _shared_task(systems)
    raw = []
    for s in systems:
        costs = [v.cost.usd_per_million_output_tokens for v in s.views
                 if v.cost is not None and v.cost.usd_per_million_output_tokens is not None
                 and v.record.output_tokens > 0]
        scores = [v.record.accuracy.score for v in s.views if v.record.accuracy is not None
                  and task is not None and v.record.accuracy.task == task[0]]
        speeds = [v.output_tokens_per_s for v in s.views if v.record.output_tokens > 0]
        raw.append((s.name, min(costs) if costs else None, scores[0] if scores else None,
                    max(speeds) if speeds else None))

    def best(values: list[float | None], lower: bool) -> float | None:
        present = [v for v in values if v is not None and v > 0]
        if not present:
            return None
        return min(present) if lower else max(present)

    best_cost = best([r[1] for r in raw], lower=True)
    best_acc = best([r[2] for r in raw], lower=not (task is None or task[1]))
    best_speed = best([r[3] for r in raw], lower=False)

    def axis(value: float | None, top: float | None, lower: bool) -> float:
        if value is None or top is None or value <= 0:
            return 0.0
        return top / value if lower else value / top

    out = [CapScores(name, cost, acc, speed, axis(cost, best_cost, True),
                     axis(acc, best_acc, not (task is None or task[1])),
                     axis(speed, best_speed, False)) for name, cost, acc, speed in raw]
    return out, None if task is None else task[0]
