"""Reading a server's Prometheus `/metrics` text: the counters a run's record keeps are the
change of every counter about experts or host-to-device traffic between the start and the end
of the run (names containing `expert`, `h2d` or `pcie`), summed over their labels."""

from __future__ import annotations

import math
import re

__all__ = ["RECORDED", "counter_deltas", "parse_metrics"]

RECORDED = re.compile(r"expert|h2d|pcie", re.IGNORECASE)
_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_metrics(text: str) -> dict[str, float]:
    """Every sample of a Prometheus text exposition, summed over labels per metric name
    (comments and unparsable lines skipped)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        try:
            value = float(match.group(3))
        except ValueError:
            continue
        if math.isfinite(value):
            out[match.group(1)] = out.get(match.group(1), 0.0) + value
    return out


def counter_deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """`after - before` of the recorded counters (`*_total` names matching `RECORDED`)."""
    return {name: value - before.get(name, 0.0) for name, value in sorted(after.items())
            if name.endswith("_total") and RECORDED.search(name)}
