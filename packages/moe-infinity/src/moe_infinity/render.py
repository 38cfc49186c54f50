"""What `moe-infinity simulate` prints for people, the JSON it prints for machines, and the plot.
Decimal units (MB = 10^6 bytes), as bandwidths are quoted."""

from __future__ import annotations

import sys
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table

from moe_infinity.evaluation import EvaluationReport
from moe_infinity.line_plot import PALETTE, Series, line_plot
from moe_infinity.model_shape import ModelShape
from moe_infinity.png import write_png
from moe_infinity.predictor import SOURCES

__all__ = ["plot_hit_rates", "print_report", "report_dict"]

_PIPE_WIDTH = 160


def _console() -> Console:
    return Console() if sys.stdout.isatty() else Console(width=_PIPE_WIDTH)


def _pct(value: float) -> str:
    return f"{value * 100:.1f}%"


def print_report(report: EvaluationReport, shape: ModelShape) -> None:
    """The per-policy table and the predictor's source recall, on stdout."""
    title = (f"{shape.describe()}; collection of {report.build_requests} requests, "
             f"{report.eval_requests} replayed; prefetch budget {report.prefetch_budget} "
             "per layer")
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    cols = ["policy", "cache", "slots", "hit rate", "decode hit", "prefetch prec",
            "prefetch recall", "MB/token", "ms/token"]
    for col in cols:
        table.add_column(col, justify="left" if col == "policy" else "right")
    for r in report.results:
        prefetching = r.prefetches > 0
        table.add_row(r.policy, _pct(r.cache_fraction), str(r.num_slots), _pct(r.hit_rate),
                      _pct(r.decode_hit_rate),
                      _pct(r.prefetch_precision) if prefetching else "-",
                      _pct(r.prefetch_recall) if prefetching else "-",
                      f"{r.bytes_per_token / 1e6:.3g}", f"{r.seconds_per_token * 1e3:.3g}")
    console = _console()
    console.print(table)
    recall = Table(title=f"Predictor sources: recall of the next layer's experts at the budget "
                         f"({report.prefetch_budget}), decode steps",
                   title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("source", "recall", "coverage", "weight"):
        recall.add_column(col, justify="left" if col == "source" else "right")
    for s in report.source_recall:
        weight = f"{report.predictor.weight(s.source):.3g}" if s.source in SOURCES else "-"
        recall.add_row(s.source, _pct(s.recall), _pct(s.coverage), weight)
    console.print(recall)
    Console(stderr=True).print("ms/token: decode bytes fetched per token over the PCIe "
                               "bandwidth (compute assumed hidden)")


def report_dict(report: EvaluationReport, shape: ModelShape) -> dict[str, object]:
    """The report as one JSON-ready object."""
    return {
        "model": shape.to_dict(), "build_requests": report.build_requests,
        "eval_requests": report.eval_requests, "prefetch_budget": report.prefetch_budget,
        "predictor": {"sources": list(report.predictor.sources),
                      "weights": dict(zip(SOURCES, report.predictor.weights, strict=True)),
                      "num_matches": report.predictor.num_matches,
                      "layer_decay": report.predictor.layer_decay,
                      "own_decay": report.predictor.own_decay},
        "source_recall": [r.__dict__ for r in report.source_recall],
        "results": [r.to_dict() for r in report.results],
    }


def plot_hit_rates(report: EvaluationReport, path: str | Path) -> Path:
    """Write the hit-rate-versus-cache-size PNG (one line per policy, legend at the right)."""
    policies = list(dict.fromkeys(r.policy for r in report.results))
    series = []
    for i, policy in enumerate(policies):
        points = tuple((r.cache_fraction, r.hit_rate) for r in report.results
                       if r.policy == policy)
        series.append(Series(policy, points, PALETTE[i % len(PALETTE)]))
    return write_png(path, line_plot(series))
