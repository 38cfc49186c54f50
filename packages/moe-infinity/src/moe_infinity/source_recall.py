"""How well each predictor source foresees the next layer's experts: recall at the prefetch
budget, measured over decode steps.

For every decode-step layer transition (layer l of step s to the next layer that runs: l+1 of
step s, or the first layer of step s+1), each source ranks the next layer's experts while layer
l runs; its recall is the share of the experts actually used there that are among its top
`budget`. The lookahead exists only within a step (L-1 of every L transitions), so its recall
is over the transitions where it exists; `coverage` says how many those are. `combined` is the
mix the prefetcher uses (`RequestPredictor.need`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from moe_infinity.collection import TraceCollection
from moe_infinity.predictor import SOURCES, PredictorConfig, RequestPredictor
from moe_infinity.trace import RequestTrace

__all__ = ["SourceRecall", "calibrated_config", "measure_recall"]


@dataclass(frozen=True)
class SourceRecall:
    """Recall at the budget of one source.

    Attributes:
        source: `trace`, `lookahead`, `own` or `combined`.
        recall: Used experts found in the top `budget`, over used experts (where available).
        coverage: Share of transitions where the source had a prediction.
    """

    source: str
    recall: float
    coverage: float


def _top(scores: np.ndarray, budget: int) -> set[int]:
    order = np.argsort(-scores, kind="stable")[:budget]
    return {int(e) for e in order if scores[e] > 0}


def measure_recall(traces: Sequence[RequestTrace], collection: TraceCollection,
                   config: PredictorConfig, budget: int) -> list[SourceRecall]:
    """Recall at `budget` of each source in `config.sources`, and of their mix."""
    names = [*config.sources, "combined"]
    found = dict.fromkeys(names, 0)
    wanted = dict.fromkeys(names, 0)
    seen = dict.fromkeys(names, 0)
    transitions = 0
    num_layers = collection.shape.num_moe_layers
    for trace in traces:
        predictor = RequestPredictor(collection, config)
        for step in range(trace.num_steps):
            for row in range(num_layers):
                nxt_step, nxt_row = (step, row + 1) if row + 1 < num_layers else (step + 1, 0)
                look = trace.lookahead[step, row + 1] if row + 1 < num_layers else None
                if nxt_step < trace.num_steps and nxt_step > 0:
                    actual = set(trace.experts_at(nxt_step, nxt_row).tolist())
                    transitions += 1
                    shares = predictor.source_shares(row, look)
                    shares["combined"] = predictor.need(row, look)
                    for name, value in shares.items():
                        if not value[nxt_row].any():
                            continue
                        seen[name] += 1
                        wanted[name] += len(actual)
                        found[name] += len(actual & _top(value[nxt_row], budget))
                predictor.observe(step, row, trace.step_counts[step, row])
    return [SourceRecall(n, found[n] / wanted[n] if wanted[n] else 0.0,
                         seen[n] / transitions if transitions else 0.0) for n in names]


def calibrated_config(traces: Sequence[RequestTrace], collection: TraceCollection,
                      config: PredictorConfig, budget: int) -> PredictorConfig:
    """`config` with each source's weight set to its measured recall on `traces` (requests the
    collection does not hold, so a request never matches itself)."""
    recalls = {r.source: r.recall for r in measure_recall(traces, collection, config, budget)}
    weights = tuple(max(recalls.get(s, 0.0), 1e-3) for s in SOURCES)
    return PredictorConfig(sources=config.sources, weights=weights,  # type: ignore[arg-type]
                           num_matches=config.num_matches, layer_decay=config.layer_decay,
                           own_decay=config.own_decay)
