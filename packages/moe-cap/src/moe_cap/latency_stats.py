"""Summaries of what the client measured: percentiles of TTFT, TPOT, inter-token latency and
end-to-end latency, throughput, and goodput under a service-level objective (SLO)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from moe_cap.errors import WorkloadError
from moe_cap.percentile import percentile
from moe_cap.request_result import RequestResult

__all__ = ["Percentiles", "Slo", "goodput_count", "percentiles"]


@dataclass(frozen=True)
class Percentiles:
    """A latency's spread over requests (or tokens), seconds.

    Attributes:
        p50: Median. p90, p99: Tails (linear interpolation between ranks).
        mean: Arithmetic mean.
        count: Values summarised.
    """

    p50: float
    p90: float
    p99: float
    mean: float
    count: int

    def to_dict(self) -> dict[str, float | int]:
        """JSON-ready form."""
        return {"p50": self.p50, "p90": self.p90, "p99": self.p99, "mean": self.mean,
                "count": self.count}

    @classmethod
    def from_dict(cls, data: dict[str, float | int]) -> Percentiles:
        """Read `to_dict`'s form."""
        return cls(float(data["p50"]), float(data["p90"]), float(data["p99"]),
                   float(data["mean"]), int(data["count"]))


def percentiles(values: Sequence[float]) -> Percentiles | None:
    """p50/p90/p99/mean of `values`, None when empty."""
    if not values:
        return None
    return Percentiles(percentile(values, 50), percentile(values, 90), percentile(values, 99),
                       sum(values) / len(values), len(values))


@dataclass(frozen=True)
class Slo:
    """A service-level objective: a request is good when it meets every limit given.

    Attributes:
        ttft_s: Most time to first token (None: no limit).
        tpot_s: Most time per output token after the first (None: no limit).
    """

    ttft_s: float | None = None
    tpot_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("ttft_s", "tpot_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                option = "--slo-" + name.removesuffix("_s")
                raise WorkloadError(f"{option} must be a positive number of seconds, "
                                    f"got {value}")

    @property
    def is_set(self) -> bool:
        """Whether any limit is given."""
        return self.ttft_s is not None or self.tpot_s is not None

    def met_by(self, row: RequestResult) -> bool:
        """Whether a successful `row` meets every limit (an unmeasured figure fails its limit;
        TPOT is not defined for a single output token, which meets the TPOT limit)."""
        if not row.ok:
            return False
        if self.ttft_s is not None and (row.ttft_s is None or row.ttft_s > self.ttft_s):
            return False
        tpot = row.tpot_s
        return self.tpot_s is None or (tpot is None and row.output_tokens <= 1) or (
            tpot is not None and tpot <= self.tpot_s)

    def to_dict(self) -> dict[str, float | None]:
        """JSON-ready form."""
        return {"ttft_s": self.ttft_s, "tpot_s": self.tpot_s}


def goodput_count(rows: Sequence[RequestResult], slo: Slo) -> int:
    """Requests that met `slo`."""
    return sum(slo.met_by(r) for r in rows)
