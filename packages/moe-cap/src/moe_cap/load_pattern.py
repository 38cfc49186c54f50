"""How requests are offered to a target: closed loop (N clients, each sending its next request
when the last one finished) or open loop (Poisson arrivals at R requests/s, seeded, optionally
capped at N outstanding), for a number of requests or a duration."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

from moe_cap.errors import WorkloadError

__all__ = ["LoadPattern", "poisson_arrivals"]


@dataclass(frozen=True, kw_only=True)
class LoadPattern:
    """The load of a run.

    Attributes:
        concurrency: Closed loop: clients sending back to back. With `rate`: the most requests
            outstanding at once (None: no cap).
        rate_per_s: Open loop: mean arrival rate (Poisson); None for closed loop.
        num_requests: Requests to send (the workload is cycled when it has fewer); None with
            `duration_s`.
        duration_s: Send new requests for this long, then wait for those in flight.
        seed: Seed of the arrival times.
    """

    concurrency: int | None = 1
    rate_per_s: float | None = None
    num_requests: int | None = None
    duration_s: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.concurrency is not None and self.concurrency < 1:
            raise WorkloadError(f"--concurrency must be >= 1, got {self.concurrency}")
        if self.rate_per_s is not None and not self.rate_per_s > 0:
            raise WorkloadError(f"--rate must be > 0 requests/s, got {self.rate_per_s}")
        if self.rate_per_s is None and self.concurrency is None:
            raise WorkloadError("a closed loop needs --concurrency (or give --rate)")
        if self.num_requests is not None and self.num_requests < 1:
            raise WorkloadError(f"--requests must be >= 1, got {self.num_requests}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise WorkloadError(f"--duration must be > 0 seconds, got {self.duration_s}")

    @property
    def mode(self) -> str:
        """`"closed"` or `"open"`."""
        return "closed" if self.rate_per_s is None else "open"

    def describe(self) -> str:
        """A short label: `concurrency 4` or `rate 2 req/s`."""
        if self.rate_per_s is None:
            return f"concurrency {self.concurrency}"
        cap = "" if self.concurrency is None else f", at most {self.concurrency} in flight"
        return f"rate {self.rate_per_s:g} req/s{cap}"

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form (the run record's `serving.load`)."""
        return {"mode": self.mode, "concurrency": self.concurrency, "rate_per_s": self.rate_per_s,
                "num_requests": self.num_requests, "duration_s": self.duration_s,
                "seed": self.seed}


def poisson_arrivals(rate_per_s: float, seed: int) -> Iterator[float]:
    """Arrival times (seconds from the start) of a Poisson process: exponential gaps of mean
    `1 / rate_per_s`, the same for the same seed."""
    rng = random.Random(seed)
    t = 0.0
    while True:
        t += rng.expovariate(rate_per_s)
        yield t
