"""What `moe-cap run` prints without `--json`: latency percentiles in milliseconds, throughput,
goodput, accuracy, the target's counters, cost and utilisation where computable."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table

from moe_cap.render import _console, print_cost, print_utilisation
from moe_cap.run_view import RunView

__all__ = ["print_run"]

_LATENCY_NAMES = {"ttft_s": "TTFT", "tpot_s": "TPOT", "itl_s": "ITL", "e2e_s": "e2e"}


def print_run(view: RunView, record_path: str) -> None:
    """The run's summary on stdout; where the files went on stderr."""
    record, console = view.record, _console()
    serving = record.serving
    title = f"{record.engine}: {record.model}"
    if record.routing is not None:
        title += f", routing {record.routing}"
    if serving is not None:
        load = serving.load
        how = (f"concurrency {load['concurrency']}" if load.get("mode") == "closed"
               else f"rate {load['rate_per_s']} req/s")
        title += f" ({serving.target_kind}, {how})"
        console.print(title, highlight=False)
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
        for col in ("latency (ms)", "p50", "p90", "p99", "mean", "n"):
            table.add_column(col, justify="left" if col.startswith("lat") else "right")
        for key, name in _LATENCY_NAMES.items():
            p = serving.latencies.get(key)
            if p is None:
                table.add_row(name, "n/a", "n/a", "n/a", "n/a", "0")
            else:
                table.add_row(name, *(f"{v * 1e3:,.1f}" for v in (p.p50, p.p90, p.p99, p.mean)),
                              str(p.count))
        console.print(table)
        lines = [f"requests: {serving.num_requests} ({serving.num_failed} failed) in "
                 f"{serving.duration_s:.3g} s: {serving.requests_per_s:.3g} req/s, "
                 f"{serving.input_tokens_per_s:,.1f} input tok/s, "
                 f"{serving.output_tokens_per_s:,.1f} output tok/s"]
        if serving.slo is not None:
            limits = " and ".join(f"{name} <= {value * 1e3:g} ms" for name, value in
                                  (("TTFT", serving.slo.ttft_s), ("TPOT", serving.slo.tpot_s))
                                  if value is not None)
            lines.append(f"goodput: {serving.goodput_requests_per_s:.3g} req/s within {limits}")
        if serving.interrupted:
            lines.append("interrupted: the record covers what was measured until then")
        for line in lines:
            console.print(line, highlight=False)
    else:
        console.print(title, highlight=False)
    if record.accuracy is not None:
        a = record.accuracy
        console.print(f"accuracy: {a.task} {a.metric} = {a.score:.4g} over {a.num_examples:,} "
                      f"{'tokens' if a.task == 'perplexity' else 'examples'}", highlight=False)
    if record.counters:
        console.print("counters: " + ", ".join(f"{k} {v:,.0f}" for k, v in
                                               record.counters.items()), highlight=False)
    if view.cost is not None:
        print_cost(view.cost)
    if view.utilisation is not None:
        print_utilisation(view.utilisation, "Utilisation (datasheet peaks)")
    err = Console(stderr=True, highlight=False)
    for note in view.notes:
        err.print(note)
    err.print(f"run record: {record_path}"
              + (f"; requests: {serving.requests_file}" if serving and serving.requests_file
                 else ""))
