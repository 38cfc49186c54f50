"""`moe-cap report`: run records in, a Markdown page out (`report.md`) with the CAP radar,
throughput-latency curves over load sweeps, S-MBU / S-MFU against batch size, measured decode
throughput against its bound, and a table of every run. Figures a record cannot support (no
load sweep, no steps) are left out with the reason on the page."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from moe_core import OutputError, write_output_text

from moe_cap.errors import MoECapError
from moe_cap.hardware import HardwareTable, Peaks
from moe_cap.report_data import cap_scores, group_systems, load_label
from moe_cap.report_plots import plot_bounds, plot_radar, plot_throughput_latency, plot_utilisation
from moe_cap.run_record import RunRecord
from moe_cap.run_view import RunView, view_run

__all__ = ["Report", "write_report"]


@dataclass(frozen=True)
class Report:
    """What `write_report` wrote.

    Attributes:
        page: The Markdown page.
        figures: The PNGs.
        skipped: Figures left out, with why.
    """

    page: Path
    figures: tuple[Path, ...]
    skipped: tuple[str, ...]


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value * 1e3:,.1f}"


def _row(path: Path, view: RunView) -> str:
    record = view.record
    serving = record.serving
    lat = serving.latencies if serving else {}

    def pct(key: str, q: str) -> float | None:
        p = lat.get(key)
        return None if p is None else getattr(p, q)

    acc = record.accuracy
    util = (view.utilisation or {}).get("all")
    cells = [
        view.name, path.name, load_label(view),
        f"{serving.requests_per_s:.3g}" if serving else "–",
        f"{view.output_tokens_per_s:,.1f}",
        f"{_ms(pct('ttft_s', 'p50'))} / {_ms(pct('ttft_s', 'p99'))}",
        f"{_ms(pct('tpot_s', 'p50'))} / {_ms(pct('tpot_s', 'p99'))}",
        _ms(pct("e2e_s", "p50")),
        "–" if serving is None or serving.goodput_requests_per_s is None
        else f"{serving.goodput_requests_per_s:.3g}",
        "–" if acc is None else f"{acc.task} {acc.score:.4g}",
        "–" if view.cost is None or view.cost.usd_per_million_output_tokens is None
        else f"${view.cost.usd_per_million_output_tokens:,.4g}",
        "–" if view.cost is None else f"{view.cost.joules_per_token:.3g}",
        "–" if util is None else f"{util.aggregate.s_mbu:.1%}",
        "–" if util is None else f"{util.aggregate.s_mfu:.1%}",
        "–" if util is None or util.aggregate.pcie is None else f"{util.aggregate.pcie:.1%}",
    ]
    return "| " + " | ".join(c.replace("|", "/") for c in cells) + " |"


_HEADER = ("| system | record | load | req/s | output tok/s | TTFT p50 / p99 (ms) | "
           "TPOT p50 / p99 (ms) | e2e p50 (ms) | goodput (req/s) | accuracy | "
           "$ / 1M output tokens | J / token | S-MBU | S-MFU | PCIe |\n"
           "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | "
           "---: | ---: | ---: |")


def write_report(paths: Sequence[Path], out: Path, table: HardwareTable,
                 peaks: Peaks = "datasheet", title: str = "CAP report") -> Report:
    """Read the records at `paths`, write `out/report.md` and its figures.

    Raises:
        RunRecordError: a record that does not read. OutputError: `out` is not a folder that
            can be written (it is created when its parent exists).
    """
    if not paths:
        raise MoECapError("give at least one run record")
    views = [view_run(RunRecord.from_json(p), table, peaks) for p in paths]
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out}: not a folder")
    try:
        out.mkdir(exist_ok=True)
    except OSError as exc:
        raise OutputError(f"--out {out}: cannot create the folder ({exc})") from None
    systems = group_systems(views)
    scores, task = cap_scores(systems)
    figures: list[tuple[str, Path, str]] = []
    skipped: list[str] = []
    figures.append(("CAP radar", plot_radar(scores, task, out / "cap_radar.png"),
                    "Each axis is relative to the best system on it (1 = best): cost is the "
                    "cheapest run's $ per 1M output tokens, performance the fastest run's output "
                    "tokens/s, accuracy the score on the task most systems report."))
    if any(len(s.serving_views) > 1 for s in systems):
        figures.append(("Throughput vs latency",
                        plot_throughput_latency(systems, out / "throughput_latency.png"),
                        "One point per run of a load sweep (client-side figures)."))
    else:
        skipped.append("throughput vs latency: no system has a load sweep (two or more runs "
                       "at different concurrency or rate)")
    if any(v.by_batch for v in views):
        figures.append(("S-MBU and S-MFU vs batch size",
                        plot_utilisation(systems, out / "utilisation_batch.png"),
                        f"Decode steps grouped by batch size, ratio of sums ({peaks} peaks)."))
        figures.append(("Measured vs bound", plot_bounds(systems, out / "measured_vs_bound.png"),
                        "Decode tokens/s measured beside what the bound allows for the same "
                        "steps."))
    else:
        skipped.append("utilisation and bounds: no record has engine steps (servers expose "
                       "none) on known hardware")
    lines = [f"# {title}", "", f"{len(views)} run record(s), {len(systems)} system(s).", ""]
    for name, path, caption in figures:
        lines += [f"## {name}", "", f"![{name}]({path.name})", "", caption, ""]
    lines += ["## Runs", "", _HEADER, *(_row(p, v) for p, v in zip(paths, views, strict=True)),
              ""]
    lines += ["CAP axes: " + "; ".join(
        f"{s.name}: cost {s.cost_axis:.2f}, accuracy {s.accuracy_axis:.2f}, performance "
        f"{s.performance_axis:.2f}" for s in scores), ""]
    notes = [f"- {p.name}: {n}" for p, v in zip(paths, views, strict=True) for n in v.notes]
    notes += [f"- {n}" for n in skipped]
    if notes:
        lines += ["## Notes", "", *notes, ""]
    page = write_output_text(out / "report.md", "\n".join(lines), "the report")
    return Report(page, tuple(f[1] for f in figures), tuple(skipped))
