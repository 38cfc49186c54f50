"""`moe-gen`: offline, throughput-first batch generation with module-based batching.

Thin commands: parse, build a config, call one library function, print. Results and the summary
go to stdout, progress to stderr; a user mistake is one line on stderr and exit status 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import moe_core
import torch
import typer
from moe_core import (
    TINY_MODEL_NAME,
    ModelSpec,
    check_output_path,
    parse_bytes,
    parse_truncate,
    resolve_model_path,
    tool_app,
    write_output_text,
)
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

import moe_gen
from moe_gen.api import Defaults
from moe_gen.job import JobConfig, JobOutcome, RayConfig, plan_job, run_job, sample_input
from moe_gen.render import plan_lines, summary_lines

__all__ = ["app"]

app = tool_app(
    "moe-gen", moe_gen.__version__,
    "moe-gen: offline, throughput-first batch generation with module-based batching.", [
        "moe-gen run --output out.jsonl    (tiny-moe, sample prompts; rerun to resume)",
        "moe-gen run MODEL --input prompts.jsonl --output out.jsonl --json record.json",
    ], resumable=("run",), runtime_version=moe_core.__version__)
_err = Console(stderr=True)

Model = Annotated[str, typer.Argument(
    help=f"Checkpoint folder, hub id, {TINY_MODEL_NAME} (the embedded model, the default) or a "
    "shipped shape with --dummy.")]
GpuMemory = Annotated[str, typer.Option(help="GPU memory budget of the whole process.")]
HostMemory = Annotated[str, typer.Option(help="Host memory for the expert store and KV pages.")]
Device = Annotated[str | None, typer.Option(help="cuda or cpu (default: cuda if present).")]
Dtype = Annotated[str | None, typer.Option(
    help="Model dtype (default: float32 on the CPU, else the checkpoint's).")]
Dummy = Annotated[bool, typer.Option("--dummy", help="Random weights of the model's shapes.")]
Layers = Annotated[int | None, typer.Option(min=1, help="Keep only the first N decoder layers.")]
ExpertDtype = Annotated[str | None, typer.Option(
    help="fp8: store and stream the routed experts as e4m3 with a scale per output channel "
         "(half of bf16's PCIe bytes; dequantised on the device; default: the model dtype).")]
CpuShare = Annotated[float, typer.Option(
    help="Most of a decode batch the planner may attend on the host (0: GPU only).")]
Routing = Annotated[str | None, typer.Option(
    help="Benchmarks only: replace the routers by uniform (uniform random top-k), "
         "zipf:s=S,reuse=R (skewed, with temporal re-use) or replay:TRACES (a trace file); "
         "dummy weights otherwise route every decode token to the same experts. Seeded by "
         "--seed.")]


def _device(device: str | None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


@app.command()
def version() -> None:
    """Print the versions of moe-gen and the moe-core runtime (as --version does)."""
    typer.echo(f"moe-gen {moe_gen.__version__} (moe-core {moe_core.__version__})")


@app.command()
def run(
    model: Model = TINY_MODEL_NAME,
    input: Annotated[Path | None, typer.Option(
        "--input", help="Requests: JSONL (id, prompt or messages, optional overrides) or plain "
        "text, one prompt per line. Default: an embedded sample.")] = None,
    output: Annotated[Path, typer.Option(help="Results JSONL (resumes: finished ids are "
                                              "skipped).")] = Path("moe-gen-out.jsonl"),
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Token limit per request.")] = 64,
    gpu_memory: GpuMemory = "12GiB",
    host_memory: HostMemory = "64GiB",
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.0,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling threshold.")] = None,
    seed: Annotated[int, typer.Option(help="Base sampling seed.")] = 0,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Always run to the limit.")
                          ] = False,
    device: Device = None, dtype: Dtype = None, dummy: Dummy = False, num_layers: Layers = None,
    max_cpu_attention_share: CpuShare = 0.75,
    expert_dtype: ExpertDtype = None,
    routing: Routing = None,
    json_path: Annotated[Path | None, typer.Option(
        "--json", help="Write the run record moe-cap reads to this file.")] = None,
    report: Annotated[Path | None, typer.Option(
        help="Write the full report (plan, profile, predicted vs measured, counters).")] = None,
    truncate: Annotated[str | None, typer.Option(
        help="A prompt too long for the model's context (with its token limit): left drops "
             "its start, right its end (default: the job refuses to start).")] = None,
    ray: Annotated[bool, typer.Option(
        "--ray", help="Run as a Ray Data pipeline, one engine actor per GPU, each with its share "
        "of --host-memory (needs the moe-gen[ray] extra).")] = False,
    ray_address: Annotated[str | None, typer.Option(
        help="The Ray cluster to join (auto, HOST:PORT, ray://HOST:PORT; implies --ray; "
             "default: RAY_ADDRESS, else a new local cluster).")] = None,
    ray_engines: Annotated[int | None, typer.Option(
        min=1, help="Engine actors on Ray (implies --ray; default: one per GPU of the cluster, "
                    "one with --device cpu).")] = None,
) -> None:
    """Complete every request of --input into --output (rerun the same command to resume).

    Every request is checked before the model loads; a request that cannot run (a bad value,
    an empty prompt, too long for the model's context) stops the job before it starts, listed
    with its line number.
    """
    config = JobConfig(model=model, input=input or sample_input(), output=output,
                       defaults=Defaults(max_new_tokens=max_new_tokens, temperature=temperature,
                                         top_p=top_p, seed=seed),
                       gpu_memory_bytes=parse_bytes(gpu_memory),
                       host_memory_bytes=parse_bytes(host_memory), device=_device(device),
                       dtype=dtype, dummy=dummy, num_layers=num_layers, eos=not ignore_eos,
                       max_cpu_attention_share=max_cpu_attention_share,
                       truncate=parse_truncate(truncate), expert_dtype=expert_dtype,
                       routing=routing,
                       ray=(RayConfig(address=ray_address, num_engines=ray_engines)
                            if ray or ray_address or ray_engines else None))
    for path, option in ((json_path, "--json"), (report, "--report")):
        if path is not None:
            check_output_path(path, option)
    outcome = _run_with_progress(config)
    for line in summary_lines(outcome):
        typer.echo(line)
    if json_path is not None and outcome.record is not None:
        write_output_text(json_path, json.dumps(outcome.record, indent=1) + "\n", "--json")
    if report is not None:
        write_output_text(report, json.dumps(_report(config, outcome), indent=1) + "\n",
                          "--report")


def _run_with_progress(config: JobConfig) -> JobOutcome:
    """Run the job with a progress bar on stderr, shown once the job's checks have passed."""
    columns = (TextColumn("[bold]moe-gen"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeRemainingColumn())
    progress = Progress(*columns, console=_err, transient=False)
    task = progress.add_task("requests", total=None, rate="")
    tokens = [0, 0.0]

    def start(total: int, done: int) -> None:
        progress.update(task, total=total, completed=done)
        progress.start()

    def step(stats: object) -> None:
        tokens[0] += len(stats.chunks)  # type: ignore[attr-defined]
        tokens[1] += stats.seconds  # type: ignore[attr-defined]
        rate = tokens[0] / tokens[1] if tokens[1] else 0.0
        progress.update(task, rate=f"{rate:,.0f} tok/s")

    try:
        return run_job(config, start, lambda _: progress.advance(task), step)
    finally:
        progress.stop()


def _report(config: JobConfig, outcome: JobOutcome) -> dict[str, object]:
    return {"engine": f"moe-gen {moe_gen.__version__}", "model": config.model,
            "device": config.device, "dtype": str(outcome.dtype),
            "expert_dtype": config.expert_dtype or str(outcome.dtype).removeprefix("torch."),
            "routing": config.routing,
            "gpu_memory_bytes": config.gpu_memory_bytes,
            "host_memory_bytes": config.host_memory_bytes,
            "plan": outcome.plan.to_dict() if outcome.plan else None,
            "profile": outcome.profile.to_dict() if outcome.profile else None,
            "summary": outcome.summary.to_dict(), "skipped": outcome.skipped,
            "num_engines": outcome.num_engines}


@app.command()
def plan(
    model: Model = TINY_MODEL_NAME,
    gpu_memory: GpuMemory = "12GiB",
    host_memory: HostMemory = "64GiB",
    prompt_tokens: Annotated[int, typer.Option(min=1, help="Prompt length to plan for.")] = 512,
    max_new_tokens: Annotated[int, typer.Option(
        min=1, help="Generation length to plan for.")] = 256,
    num_requests: Annotated[int, typer.Option(min=1, help="Requests in the job.")] = 4096,
    device: Device = None, dtype: Dtype = None, num_layers: Layers = None,
    max_cpu_attention_share: CpuShare = 0.75,
    expert_dtype: ExpertDtype = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Profile this machine and print the plan, its predicted step time and the bound."""
    spec = ModelSpec.from_pretrained(resolve_model_path(model, weights=False))
    spec = spec if num_layers is None else spec.truncated(num_layers)
    config = JobConfig(model=model, input=Path(), output=Path(),
                       gpu_memory_bytes=parse_bytes(gpu_memory),
                       host_memory_bytes=parse_bytes(host_memory), device=_device(device),
                       dtype=dtype, max_cpu_attention_share=max_cpu_attention_share,
                       expert_dtype=expert_dtype)
    chosen, profile = plan_job(config, spec, prompt_tokens, max_new_tokens, num_requests)
    if as_json:
        json.dump({"model": model, "plan": chosen.to_dict(), "profile": profile.to_dict()},
                  sys.stdout)
        sys.stdout.write("\n")
        return
    for line in plan_lines(chosen, profile):
        typer.echo(line)
