"""Each predictor source's recall measured while requests run, for the live prefetcher's mixing
weights.

The simulator calibrates the weights once, on held-out traces (`source_recall.calibrated_config`:
each source's recall at the prefetch budget). A running engine has no held-out set, so it
measures the same thing as it goes: at every decode-step layer transition, each source's top
`budget` experts of the next layer (as predicted while the layer before ran) are compared with
the experts that layer then used. A source's weight is its recall so far, started from a prior
of `prior_found / prior_wanted` (one half) so that the first few transitions cannot silence it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from moe_infinity.predictor import SOURCES

__all__ = ["OnlineRecall"]


class OnlineRecall:
    """Recall at `budget` of each source, over the transitions seen so far.

    Attributes:
        budget: Experts per prediction compared (the prefetch budget, or top-k).
        found: Used experts each source had in its top `budget` (prior included).
        wanted: Used experts at the transitions where each source predicted (prior included).
    """

    def __init__(self, budget: int, prior_found: float = 1.0, prior_wanted: float = 2.0) -> None:
        if budget <= 0 or prior_wanted <= 0 or not 0 <= prior_found <= prior_wanted:
            raise ValueError(f"bad OnlineRecall settings: budget {budget}, prior "
                             f"{prior_found}/{prior_wanted}")
        self.budget = budget
        self.found = dict.fromkeys(SOURCES, prior_found)
        self.wanted = dict.fromkeys(SOURCES, prior_wanted)

    def update(self, predicted: Mapping[str, np.ndarray], used: np.ndarray) -> None:
        """One transition: each source's `[E]` shares for a layer, and the `[E]` counts that
        layer then routed."""
        actual = set(np.flatnonzero(used).tolist())
        for source, shares in predicted.items():
            if not shares.any():
                continue  # no prediction here (e.g. no lookahead across steps)
            top = np.argsort(-shares, kind="stable")[: self.budget]
            self.found[source] += len(actual & {int(e) for e in top if shares[e] > 0})
            self.wanted[source] += len(actual)

    def weights(self) -> tuple[float, float, float]:
        """Each source's recall so far, in `SOURCES` order."""
        a, b, c = (self.found[s] / self.wanted[s] for s in SOURCES)
        return a, b, c
