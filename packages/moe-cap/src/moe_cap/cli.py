"""`moe-cap`: sparsity-aware metrics, the hardware table, and the price of a run.

Thin commands: each parses its options, calls one library function and prints. Results go to
stdout (`--json`: one JSON object); errors are one line on stderr and exit status 1.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import moe_core
import typer
from moe_core import (
    TINY_MODEL_NAME,
    ModelSpec,
    known_shapes,
    parse_bytes,
    resolve_model_path,
    tool_app,
)

import moe_cap
from moe_cap.cli_run import run
from moe_cap.cost import CostConfig, price_run
from moe_cap.detect import detect_gpu
from moe_cap.errors import MoECapError
from moe_cap.hardware import GpuSpec, HardwareTable, Peaks, load_hardware_table, names_no_gpu
from moe_cap.render import print_cost, print_hardware, print_metrics, print_utilisation
from moe_cap.report import write_report
from moe_cap.roofline import metrics_sweep
from moe_cap.run_record import RunRecord
from moe_cap.utilisation import run_peaks, run_samples, summarise

__all__ = ["app"]

app = tool_app(
    "moe-cap", moe_cap.__version__,
    "moe-cap: sparsity-aware metrics, hardware tables and cost of MoE inference.", [
        "moe-cap metrics mixtral-8x7b --gpu H200 --batch 1,32,256",
        "moe-cap cost run-record.json    (price a run record from moe-gen run --json)",
        "moe-cap run --url http://127.0.0.1:8000/v1 --model qwen3 --input-len 512 "
        "--output-len 128 --concurrency 4 --out c4.json",
        "moe-cap run --engine moe-gen tiny-moe --task gsm8k --data gsm8k_test.jsonl --out g.json",
        "moe-cap report c1.json c4.json g.json --out report/",
    ], runtime_version=moe_core.__version__)

app.command()(run)

HardwareFile = Annotated[Path | None, typer.Option(
    "--hardware-file", help="YAML file overriding or extending the hardware table "
                            "(else $MOE_CAP_HARDWARE).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]
RecordGpu = Annotated[str | None, typer.Option(
    help="GPU from the hardware table, overriding the run record's; 'none' for a run on the CPU "
         "alone.")]
PeaksOpt = Annotated[str, typer.Option(
    help="Peak rates to divide by: 'datasheet', or 'measured' where the table has them.")]


def _emit(data: object) -> None:
    json.dump(data, sys.stdout)
    sys.stdout.write("\n")


def _peaks(value: str) -> Peaks:
    if value not in ("datasheet", "measured"):
        raise MoECapError(f"--peaks must be 'datasheet' or 'measured', got {value!r}")
    return value  # type: ignore[return-value]


def _spec(model: str, num_layers: int | None) -> ModelSpec:
    spec = ModelSpec.from_pretrained(resolve_model_path(model, weights=False))
    return spec if num_layers is None else spec.truncated(num_layers)


def _gpu(table: HardwareTable, name: str | None) -> GpuSpec:
    return detect_gpu(table) if name is None else table.gpu(name)


def _batches(text: str) -> list[int]:
    try:
        return [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise MoECapError(f"--batch takes comma-separated integers, got {text!r}") from None


@app.command()
def version() -> None:
    """Print the versions of moe-cap and the moe-core runtime (as --version does)."""
    typer.echo(f"moe-cap {moe_cap.__version__} (moe-core {moe_core.__version__})")


@app.command()
def metrics(
    model: Annotated[str, typer.Argument(
        help=f"Checkpoint folder, hub id, {TINY_MODEL_NAME} (the embedded model, the default) "
        f"or a shipped shape: {', '.join(known_shapes())}. Only config.json is read.")
    ] = TINY_MODEL_NAME,
    batch: Annotated[str, typer.Option(help="Batch sizes, comma-separated.")] = "1,32,256",
    context: Annotated[int, typer.Option(
        help="Prompt length (prefill) and cached tokens (decode).")] = 1024,
    gpu: Annotated[str | None, typer.Option(
        help="GPU from the hardware table (default: detect the local one).")] = None,
    dtype: Annotated[str, typer.Option(help="Weight storage format.")] = "bf16",
    kv_dtype: Annotated[str, typer.Option(help="KV-cache storage format.")] = "bf16",
    expert_dtype: Annotated[str | None, typer.Option(
        help="Routed-expert storage format, if not --dtype.")] = None,
    compute_dtype: Annotated[str | None, typer.Option(
        help="Matrix-product precision for the peak (default: --dtype).")] = None,
    num_layers: Annotated[int | None, typer.Option(
        help="Keep only the first N decoder layers.")] = None,
    gpu_memory: Annotated[str | None, typer.Option(
        help="GPU memory budget (e.g. 16GiB): experts that do not fit cross PCIe.")] = None,
    peaks: PeaksOpt = "datasheet",
    hardware_file: HardwareFile = None,
    as_json: AsJson = False,
) -> None:
    """Bytes, FLOPs, activated experts, bounds and tokens/s ceilings per batch size."""
    spec = _spec(model, num_layers)
    table = load_hardware_table(hardware_file)
    target = _gpu(table, gpu)
    rows = metrics_sweep(spec, _batches(batch), context, target, weight_dtype=dtype,
                         kv_dtype=kv_dtype, expert_dtype=expert_dtype,
                         compute_dtype=compute_dtype, peaks=_peaks(peaks),
                         gpu_memory_bytes=None if gpu_memory is None
                         else parse_bytes(gpu_memory))
    if as_json:
        _emit({"model": model, "gpu": target.name, "peaks": peaks, "context": context,
               "rows": [r.to_dict() for r in rows]})
    else:
        print_metrics(rows, f"{model} on {target.name} ({peaks} peaks), context {context}")


@app.command()
def hardware(hardware_file: HardwareFile = None, as_json: AsJson = False) -> None:
    """List the hardware table: GPUs, CPUs and host memory, each row with its source."""
    table = load_hardware_table(hardware_file)
    if as_json:
        _emit({"sources": list(table.sources), "gpus": [asdict(g) for g in table.gpus],
               "cpus": [asdict(c) for c in table.cpus], "dram": [asdict(d) for d in table.dram]})
    else:
        print_hardware(table)


@app.command()
def cost(
    run_record: Annotated[Path, typer.Argument(help="Run record JSON (docs/moe-cap.md).")],
    gpu: RecordGpu = None,
    years: Annotated[float, typer.Option(help="Amortisation period of purchases.")] = 3.0,
    utilisation: Annotated[float, typer.Option(
        help="Share of those years the machine does paid work.")] = 1.0,
    usd_per_kwh: Annotated[float, typer.Option(help="Electricity price.")] = 0.15,
    pue: Annotated[float, typer.Option(help="Power usage effectiveness of the room.")] = 1.0,
    gpu_load: Annotated[float, typer.Option(
        help="Share of TDP a GPU draws when energy was not measured.")] = 1.0,
    cpu_load: Annotated[float, typer.Option(
        help="Share of TDP the CPU draws when energy was not measured.")] = 1.0,
    cpu: Annotated[str | None, typer.Option(help="Host CPU (overrides the record).")] = None,
    cpu_sockets: Annotated[float, typer.Option(help="CPU sockets charged.")] = 1.0,
    dram_gib: Annotated[float | None, typer.Option(
        help="Host memory charged, GiB (overrides the record).")] = None,
    dram: Annotated[str, typer.Option(help="Host memory kind.")] = "DDR5 RDIMM",
    no_host: Annotated[bool, typer.Option(
        "--no-host", help="Charge the GPUs only, not the host CPU and memory.")] = False,
    cloud_usd_per_hour: Annotated[float | None, typer.Option(
        help="All-in cloud rate; replaces purchase and energy.")] = None,
    hardware_file: HardwareFile = None,
    as_json: AsJson = False,
) -> None:
    """Price a run record: $/hour, $ per 1M input and output tokens, joules per token."""
    config = CostConfig(years=years, utilisation=utilisation, usd_per_kwh=usd_per_kwh,
                        pue=pue, gpu=gpu, gpu_load=gpu_load, cpu_load=cpu_load, cpu=cpu,
                        cpu_sockets=cpu_sockets, dram_gib=dram_gib, dram=dram,
                        include_host=not no_host, cloud_usd_per_hour=cloud_usd_per_hour)
    record = RunRecord.from_json(run_record)
    report = price_run(record, load_hardware_table(hardware_file), config)
    if as_json:
        _emit({"run_record": str(run_record), "engine": record.engine,
               "gpu": gpu or record.gpu, **report.to_dict()})
    else:
        print_cost(report)


@app.command("utilisation")
def utilisation_command(
    run_record: Annotated[Path, typer.Argument(help="Run record JSON (docs/moe-cap.md).")],
    peaks: PeaksOpt = "datasheet",
    gpu: RecordGpu = None,
    cpu: Annotated[str | None, typer.Option(
        help="Host CPU (overrides the record's): the rates a run on the CPU alone is divided "
             "by.")] = None,
    hardware_file: HardwareFile = None,
    as_json: AsJson = False,
) -> None:
    """S-MBU, S-MFU and PCIe utilisation of a run record: time-weighted, plus percentiles."""
    record = RunRecord.from_json(run_record)
    if not record.steps:
        raise MoECapError(f"{run_record}: the record has no engine steps (a server measured "
                          f"from outside shows none), so there is no utilisation to compute")
    spec = _spec(record.model, None)
    device, peak = run_peaks(record, load_hardware_table(hardware_file), _peaks(peaks), gpu, cpu)
    summaries = summarise(run_samples(record, spec), peak)
    on_cpu = names_no_gpu(gpu or record.gpu)
    if as_json:
        _emit({"run_record": str(run_record), "engine": record.engine,
               **({"cpu": device} if on_cpu else {"gpu": device}),
               "peaks": peaks, "phases": {k: v.to_dict() for k, v in summaries.items()}})
    else:
        where = f"the CPU alone, {device}" if on_cpu else f"{record.num_gpus} x {device}"
        print_utilisation(summaries, f"{record.engine}: {record.model} on {where} ({peaks} "
                                     f"peaks)")


@app.command()
def report(
    run_records: Annotated[list[Path], typer.Argument(
        help="Run records (from moe-cap run, moe-gen run --json, ...).")],
    out: Annotated[Path, typer.Option(help="Folder for report.md and its PNG figures.")],
    title: Annotated[str, typer.Option(help="The page's title.")] = "CAP report",
    peaks: PeaksOpt = "datasheet",
    hardware_file: HardwareFile = None,
) -> None:
    """A Markdown page with the CAP radar, throughput-latency curves, S-MBU / S-MFU vs batch,
    measured vs bound, and a table of every run."""
    written = write_report(run_records, out, load_hardware_table(hardware_file), _peaks(peaks),
                           title)
    typer.echo(str(written.page))
    for figure in written.figures:
        typer.echo(str(figure))
    for reason in written.skipped:
        typer.echo(f"left out: {reason}", err=True)
