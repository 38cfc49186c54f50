"""Whether the host share a plan chose pays, measured on the job's own first decode steps.

The planner picks the share of each decode batch the host attends from the profile's host
attention rate and its cost model. Both proved the least certain inputs of a plan
(docs/benchmarks.md, ninth session):
- on one H200 machine the profile's host rate for the same model measured 11.6 M keys/s in one
  process and 23.6 M in the next;
- with FP8 experts, a share of 0.25 was predicted 18% faster than none and ran 10% slower
  (1,062 against 1,173 decode tok/s on S3).

So a GPU job whose plan gives the host a share checks it. After a few decode steps to warm up,
its decode steps alternate the planned share and none, in pairs of consecutive steps of the same
batch. Once it has `pairs` of them, the job keeps whichever share made the pairs' steps faster
(the median of the ratios none / planned) for the rest of the run. Alternating cancels the
context's growth; a step that runs a prompt, or a batch that changes, breaks the pair it falls
in, and the pair starts again. Everything else of the plan stays. The steps say which share they
ran (`StepStats.host_share`), so the summary shows the trial and its outcome.
"""

from __future__ import annotations

import statistics

__all__ = ["HostShareTrial"]


class HostShareTrial:
    """The share each step runs at while the trial lasts, and the one kept after it.

    Attributes:
        planned: The plan's host share (> 0).
        pairs: Pairs of steps (planned, then none) measured before deciding.
        ratios: Each complete pair's seconds with no host share over its seconds with the
            planned one.
        kept: The share kept for the rest of the run; None while the trial lasts.
    """

    def __init__(self, planned: float, pairs: int = 3, warmup: int = 2) -> None:
        """`warmup` decode steps run at the planned share before the first pair.

        Raises:
            ValueError: a planned share outside (0, 1], or a non-positive `pairs` or negative
                `warmup`.
        """
        if not 0.0 < planned <= 1.0:
            raise ValueError(f"a host share trial needs a planned share in (0, 1], got {planned}")
        if pairs <= 0 or warmup < 0:
            raise ValueError(f"pairs must be positive and warmup not negative, got {pairs} and "
                             f"{warmup}")
        self.planned = planned
        self.pairs = pairs
        self.ratios: list[float] = []
        self.kept: float | None = None
        self._warmup = warmup
        self._first: tuple[int, float] | None = None  # (batch, seconds) of a pair's first step

    def share(self, batch: int, decode: bool) -> float:
        """The host share of the next step: `batch` sequences, `decode` if none runs a prompt."""
        if self.kept is not None:
            return self.kept
        if decode and self._first is not None and self._first[0] == batch:
            return 0.0  # the pair's second step
        return self.planned

    def record(self, share: float, batch: int, decode: bool, seconds: float) -> None:
        """A step ran at `share` (as `share()` said) over `batch` sequences in `seconds`."""
        if self.kept is not None:
            return
        if not decode:
            self._first = None
            return
        if self._warmup > 0:
            self._warmup -= 1
            return
        first = self._first
        if share == 0.0 and first is not None and first[0] == batch:
            self.ratios.append(seconds / first[1])
            self._first = None
            if len(self.ratios) == self.pairs:
                self.kept = 0.0 if statistics.median(self.ratios) < 1.0 else self.planned
            return
        self._first = (batch, seconds) if share == self.planned else None
