"""Tables for people: what `moe-cap metrics`, `hardware`, `cost` and `utilisation` print without
`--json`. Decimal units throughout (GB = 10^9 bytes, TFLOP = 10^12), as bandwidths are quoted."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from rich import box
from rich.console import Console
from rich.table import Table

from moe_cap.cost import CostReport
from moe_cap.hardware import HardwareTable
from moe_cap.roofline import MetricsRow
from moe_cap.utilisation import UtilisationSummary

__all__ = ["print_cost", "print_hardware", "print_metrics", "print_utilisation"]

# A pipe or a file gets lines this wide; a terminal its own width.
_PIPE_WIDTH = 160


def _console() -> Console:
    return Console() if sys.stdout.isatty() else Console(width=_PIPE_WIDTH)


def _num(value: float) -> str:
    """Short numbers: three significant figures, thousands in full (`1,340`)."""
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def _table(title: str, columns: Sequence[str], right: Sequence[str] = ()) -> Table:
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in columns:
        table.add_column(col, justify="right" if col in right else "left")
    return table


def print_metrics(rows: Sequence[MetricsRow], title: str) -> None:
    """One line per phase and batch size (FLOPs in TFLOP, bytes in GB, bounds in ms)."""
    offload = any(r.h2d_bytes for r in rows)
    cols = ["phase", "batch", "TFLOP", "GB", "experts", "mem ms", "FLOP ms",
            *(["PCIe GB", "PCIe ms"] if offload else []), "bound", "tok/s max"]
    table = _table(title, cols, [c for c in cols if c not in ("phase", "bound")])
    for r in rows:
        experts = f"{r.cost.experts.mean_expected:.1f}"
        if r.cost.experts.num_shared:
            experts += f"+{r.cost.experts.num_shared}"
        pcie = [_num(r.h2d_bytes / 1e9), _num(r.bounds.pcie_s * 1e3)] if offload else []
        table.add_row(r.phase, str(r.batch), _num(r.cost.flops / 1e12), _num(r.cost.bytes / 1e9),
                      experts, _num(r.bounds.memory_s * 1e3), _num(r.bounds.compute_s * 1e3),
                      *pcie, r.bounds.limit, _num(r.bounds.tokens_per_s))
    _console().print(table)
    Console(stderr=True).print("experts: distinct routed experts per MoE layer (+shared), "
                               "uniform routing; bounds assume perfect overlap")


_PRECISIONS = ("fp32", "tf32", "bf16", "fp16", "fp8", "int8", "fp4")


def print_hardware(table: HardwareTable) -> None:
    """The GPU, CPU and host memory tables; sources listed under each."""
    console = _console()
    cols = ["GPU", "GB", "GB/s", "PCIe", "W", "$", *_PRECISIONS]
    gpus = _table("GPUs: memory GB, bandwidth GB/s, PCIe GB/s (one way, x16), TDP W, price $, "
                  "dense peak TFLOP/s (no sparsity)",
                  cols, cols[1:])
    notes = []
    for g in table.gpus:
        peaks = [_num(g.peak_flops_per_s[p] / 1e12) if p in g.peak_flops_per_s else "-"
                 for p in _PRECISIONS]
        gpus.add_row(g.name, _num(g.memory_bytes / 1e9),
                     _num(g.memory_bandwidth_bytes_per_s / 1e9),
                     f"gen{g.pcie_gen} {_num(g.pcie_bytes_per_s / 1e9)}", _num(g.tdp_w),
                     f"{g.price_usd:,.0f}", *peaks)
        notes.append(f"{g.name}: {g.source}; price: {g.price_source}")
        m = g.measured
        if m is not None:
            parts = [f"PCIe h2d {_num(m.pcie_h2d_bytes_per_s / 1e9)} GB/s"
                     if m.pcie_h2d_bytes_per_s else "",
                     f"memory {_num(m.memory_bandwidth_bytes_per_s / 1e9)} GB/s"
                     if m.memory_bandwidth_bytes_per_s else "",
                     *(f"{k} {_num(v / 1e12)} TFLOP/s" for k, v in m.flops_per_s.items())]
            notes.append(f"{g.name} measured: {', '.join(p for p in parts if p)} ({m.source})")
    console.print(gpus)
    for note in notes:
        console.print(f"  {note}", highlight=False)
    cols = ["CPU", "cores", "W", "memory", "GB/s", "$"]
    cpus = _table("CPUs (one socket)", cols, ["cores", "W", "GB/s", "$"])
    for c in table.cpus:
        cpus.add_row(c.name, str(c.cores), _num(c.tdp_w), c.memory,
                     _num(c.memory_bandwidth_bytes_per_s / 1e9), f"{c.price_usd:,.0f}")
    console.print(cpus)
    for c in table.cpus:
        console.print(f"  {c.name}: {c.source}", highlight=False)
    dram = _table("Host memory", ["memory", "W/GiB", "$/GiB"], ["W/GiB", "$/GiB"])
    for d in table.dram:
        dram.add_row(d.name, f"{d.watts_per_gib:g}", f"{d.usd_per_gib:g}")
    console.print(dram)
    for d in table.dram:
        console.print(f"  {d.name}: {d.source}", highlight=False)


def _usd(value: float | None) -> str:
    return "n/a (no such tokens)" if value is None else f"${value:,.4g}"


def print_cost(report: CostReport) -> None:
    """The run's price, energy and what was estimated."""
    table = Table(show_header=False, title="Cost", title_justify="left", box=box.SIMPLE)
    parts = ", ".join(f"{k} ${v:.4g}" for k, v in report.usd_per_hour_parts.items())
    energy = ", ".join(f"{k} {e.joules:,.0f} J ({'measured' if e.measured else 'estimated'})"
                       for k, e in report.energy.items())
    j_in, j_out = report.joules_per_input_token, report.joules_per_output_token
    for field, value in (
        ("$/hour", f"${report.usd_per_hour:.4g} ({parts})"),
        ("run", f"${report.run_usd:.4g}"),
        ("$ per 1M input tokens", _usd(report.usd_per_million_input_tokens)),
        ("$ per 1M output tokens", _usd(report.usd_per_million_output_tokens)),
        ("$ per 1M tokens", _usd(report.usd_per_million_tokens)),
        ("energy", energy),
        ("J per token", f"{report.joules_per_token:.4g} (input "
                        f"{'n/a' if j_in is None else f'{j_in:.4g}'}, output "
                        f"{'n/a' if j_out is None else f'{j_out:.4g}'})"),
        ("prefill share of time", f"{report.prefill_share:.1%}"),
        *(("note", n) for n in report.notes),
    ):
        table.add_row(field, value)
    _console().print(table)


def print_utilisation(summaries: dict[str, UtilisationSummary], title: str) -> None:
    """Aggregates (ratio of sums) and per-step percentiles, per phase."""
    cols = ["phase", "steps", "seconds", "tok/s", "S-MBU", "S-MFU", "PCIe",
            "S-MBU p50/p90/p99", "S-MFU p50/p90/p99"]
    table = _table(title, cols, cols[1:])
    for s in summaries.values():
        p = s.percentiles
        table.add_row(s.phase, str(s.num_steps), f"{s.seconds:.4g}", f"{s.tokens_per_s:,.1f}",
                      f"{s.aggregate.s_mbu:.1%}", f"{s.aggregate.s_mfu:.1%}",
                      "n/a" if s.aggregate.pcie is None else f"{s.aggregate.pcie:.1%}",
                      "/".join(f"{p[k].s_mbu:.1%}" for k in ("p50", "p90", "p99")),
                      "/".join(f"{p[k].s_mfu:.1%}" for k in ("p50", "p90", "p99")))
    _console().print(table)
