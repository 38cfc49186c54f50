"""The CAP report's figures, drawn with matplotlib's object API on the Agg canvas (no pyplot
state, no display needed): the CAP radar, throughput against latency across a load sweep,
S-MBU / S-MFU against decode batch size, and measured decode throughput against its bound."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec

from moe_cap.report_data import CapScores, SystemRuns, load_label

__all__ = ["plot_bounds", "plot_radar", "plot_throughput_latency", "plot_utilisation"]

_DPI = 110
# Typed Any: matplotlib types its setting names as literals.
_STYLE: Any = {"font.size": 11, "axes.titlesize": 12.5, "axes.labelsize": 11,
               "legend.fontsize": 9.5}
P = ParamSpec("P")


def _styled(plot: Callable[P, Path]) -> Callable[P, Path]:
    """Draw and save inside the report's style (matplotlib's global settings are untouched)."""
    @functools.wraps(plot)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> Path:
        import matplotlib

        with matplotlib.rc_context(_STYLE):
            return plot(*args, **kwargs)
    return wrapper


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=_DPI, layout="constrained")


def _save(fig: Any, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=_DPI)
    return path


def _batch_axis(ax: Any) -> None:
    """A log2 x axis of batch sizes labelled 1, 2, 4, ... (not 2^0, 2^1, ...)."""
    from matplotlib.ticker import FuncFormatter

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


@_styled
def plot_radar(scores: list[CapScores], task: str | None, path: Path) -> Path:
    """One polygon per system on the cost, accuracy and performance axes (1 = best)."""
    fig = _figure(7.5, 6.2)
    ax = fig.add_subplot(projection="polar")
    labels = ["Cost\n(cheapest $/1M output tokens = 1)",
              f"Accuracy\n({task or 'no task measured'}; best = 1)",
              "Performance\n(fastest output tokens/s = 1)"]
    angles = [math.pi / 2 + i * 2 * math.pi / 3 for i in range(3)]
    for color, s in zip(_colors(len(scores)), scores, strict=True):
        values = [s.cost_axis, s.accuracy_axis, s.performance_axis]
        ax.plot([*angles, angles[0]], [*values, values[0]], color=color, linewidth=2,
                marker="o", label=s.name)
        ax.fill([*angles, angles[0]], [*values, values[0]], color=color, alpha=0.15)
    ax.set_xticks(angles, labels)
    ax.tick_params(axis="x", pad=22)  # the axis names clear the polygons' corners
    ax.set_ylim(0, 1.05)
    ax.set_yticks([0.25, 0.5, 0.75, 1.0], ["0.25", "0.5", "0.75", "1"], color="0.4",
                  fontsize=9)
    ax.set_rlabel_position(270)  # radial ticks in the empty sector between two axes
    ax.set_title("CAP: cost, accuracy, performance (relative to the best system)", pad=28)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=1, frameon=False)
    return _save(fig, path)


@_styled
def plot_throughput_latency(systems: list[SystemRuns], path: Path) -> Path:
    """Output tokens/s against median TPOT and p99 TTFT, one line per system across its loads."""
    fig = _figure(11, 5.2)
    left, right = fig.subplots(1, 2)
    for color, system in zip(_colors(len(systems)), systems, strict=True):
        points = []
        for v in system.serving_views:
            lat = v.record.serving.latencies if v.record.serving else {}
            points.append((v.output_tokens_per_s, lat.get("tpot_s"), lat.get("ttft_s"),
                           load_label(v)))
        for ax, key in ((left, 1), (right, 2)):
            chosen = [(x, p, lab) for x, *ps, lab in points
                      if (p := ps[key - 1]) is not None]
            if not chosen:
                continue
            xs = [c[0] for c in chosen]
            ys = [(c[1].p50 if key == 1 else c[1].p99) * 1e3 for c in chosen]
            ax.plot(xs, ys, color=color, marker="o", linewidth=2, label=system.name)
            for x, y, (_, _, lab) in zip(xs, ys, chosen, strict=True):
                ax.annotate(lab, (x, y), textcoords="offset points", xytext=(5, 5),
                            fontsize=9, color=color)
    left.set(xlabel="output throughput (tokens/s)", ylabel="median TPOT (ms)",
             title="Decode latency vs throughput")
    right.set(xlabel="output throughput (tokens/s)", ylabel="p99 TTFT (ms)",
              title="Tail time to first token vs throughput")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
        top = max((line.get_ydata().max() for line in ax.get_lines()), default=1.0)
        ax.set_ylim(0, top * 1.15)  # room above the highest point for its label
        ax.set_xlim(left=0)
    handles, labels = left.get_legend_handles_labels()
    if handles:  # one legend for both panels, under them: it never hides a point
        fig.legend(handles, labels, loc="outside lower center", ncol=min(2, len(handles)),
                   frameon=False)
    fig.suptitle("Labels: cN = N concurrent clients, rR = R requests/s (Poisson)", fontsize=10,
                 color="0.35")
    return _save(fig, path)


@_styled
def plot_utilisation(systems: list[SystemRuns], path: Path) -> Path:
    """Decode S-MBU and S-MFU (time-weighted per batch size) against the batch size."""
    fig = _figure(11, 4.6)
    mbu, mfu = fig.subplots(1, 2)
    for color, system in zip(_colors(len(systems)), systems, strict=True):
        rows = sorted((b.batch, b.s_mbu, b.s_mfu) for v in system.views for b in v.by_batch)
        if not rows:
            continue
        batches = [r[0] for r in rows]
        mbu.plot(batches, [r[1] * 100 for r in rows], color=color, marker="o", linewidth=2,
                 label=system.name)
        mfu.plot(batches, [r[2] * 100 for r in rows], color=color, marker="o", linewidth=2,
                 label=system.name)
    for ax, name in ((mbu, "S-MBU"), (mfu, "S-MFU")):
        ax.set(xlabel="decode batch size (sequences per step)", ylabel=f"{name} (% of peak)",
               title=f"{name} vs batch size (decode steps)")
        _batch_axis(ax)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3, which="both")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left")
    return _save(fig, path)


@_styled
def plot_bounds(systems: list[SystemRuns], path: Path) -> Path:
    """Measured decode tokens/s per batch size beside the bound for the same steps."""
    fig = _figure(8.5, 5)
    ax = fig.add_subplot()
    for color, system in zip(_colors(len(systems)), systems, strict=True):
        rows = sorted((b.batch, b.tokens_per_s, b.bound_tokens_per_s)
                      for v in system.views for b in v.by_batch)
        if not rows:
            continue
        batches = [r[0] for r in rows]
        ax.plot(batches, [r[1] for r in rows], color=color, marker="o", linewidth=2,
                label=f"{system.name}: measured")
        ax.plot(batches, [r[2] for r in rows], color=color, linestyle="--", linewidth=1.5,
                label=f"{system.name}: bound")
    ax.set(xlabel="decode batch size (sequences per step)",
           ylabel="decode throughput (tokens/s, log scale)",
           title="Measured decode throughput vs the bound max(bytes/BW, FLOPs/peak, PCIe)")
    _batch_axis(ax)
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best")
    return _save(fig, path)
