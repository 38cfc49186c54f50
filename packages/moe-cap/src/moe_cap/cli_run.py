"""`moe-cap run`: parse the options, build the target, workload and load, call
`run_benchmark` (or `run_scoring` for log-likelihood tasks), print the summary."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from moe_core import parse_bytes
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from moe_cap.accuracy_result import AccuracyResult
from moe_cap.engine_options import ENGINES, EngineOptions, check_expert_dtype
from moe_cap.errors import WorkloadError
from moe_cap.gsm8k import PromptStyle, gsm8k_items, read_math_problems, score_gsm8k
from moe_cap.hardware import load_hardware_table
from moe_cap.latency_stats import Slo
from moe_cap.length_distribution import parse_length
from moe_cap.load_pattern import LoadPattern
from moe_cap.render_run import print_run
from moe_cap.request_result import RequestResult
from moe_cap.run_benchmark import Progress as RunProgress
from moe_cap.run_benchmark import RunConfig, Scorer, ServerSpec, run_benchmark
from moe_cap.run_view import view_run
from moe_cap.scoring_run import ScoringConfig, run_scoring
from moe_cap.target import GenerationSettings
from moe_cap.workload import SyntheticSpec, WorkItem, read_workload, synthetic_workload

__all__ = ["run"]

TASKS = ("gsm8k", "perplexity", "choice")


class _Bar(RunProgress):
    """A rich progress bar on stderr (only on a terminal)."""

    def __init__(self) -> None:
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[failed]} failed"), TimeElapsedColumn(),
                            console=None, transient=True, disable=not sys.stderr.isatty())
        self.task = self.bar.add_task("requests", total=None, failed=0)
        self.failed = 0

    def start(self, total: int | None, duration_s: float | None) -> None:
        self.bar.start()
        self.bar.update(self.task, total=total)

    def advance(self, row: RequestResult) -> None:
        self.failed += not row.ok
        self.bar.update(self.task, advance=1, failed=self.failed)


def _target(url: str | None, model: str | None, engine: str | None, api_key: str | None,
            options: dict[str, Any], label: str | None = None) -> ServerSpec | EngineOptions:
    if (url is None) == (engine is None):
        raise WorkloadError("give a target: --url URL --model NAME (a server) or --engine "
                            f"{{{','.join(ENGINES)}}} MODEL (in process)")
    if label is not None and (url is None or not label.strip()):
        raise WorkloadError("--label names a server (with --url) and must not be empty; "
                            "engines name themselves")
    if url is not None:
        if not model:
            raise WorkloadError("--url needs --model NAME (the model name the server serves)")
        return ServerSpec(url, model, api_key or os.environ.get("OPENAI_API_KEY"), label)
    assert engine is not None
    return EngineOptions(engine=engine, model=model or "tiny-moe", **options)


def _workload(workload: Path | None, task: str | None, data: Path | None, input_len: str | None,
              output_len: str, num_prompts: int, seed: int, shots: int, shots_data: Path | None,
              style: str, limit: int | None, max_tokens: int) -> tuple[list[WorkItem],
                                                                     Scorer | None]:
    given = sum(x is not None for x in (workload, task, input_len))
    if given != 1:
        raise WorkloadError("give one workload: --workload FILE, --task NAME --data FILE, or "
                            "--input-len DIST (synthetic)")
    if workload is not None:
        return read_workload(workload), None
    if input_len is not None:
        spec = SyntheticSpec(num_prompts, parse_length(input_len, "--input-len"),
                             parse_length(output_len, "--output-len"), seed)
        return synthetic_workload(spec), None
    if data is None:
        raise WorkloadError(f"--task {task} needs --data FILE (a local JSONL)")
    if style not in ("chat", "completion"):
        raise WorkloadError(f"--prompt-style must be chat or completion, got {style!r}")
    problems = read_math_problems(data)
    if limit is not None:
        problems = problems[:limit]
    if shots and shots_data is None:
        raise WorkloadError("--shots needs --shots-data FILE (worked examples, e.g. the train "
                            "split; never the problems scored)")
    shot_problems = read_math_problems(shots_data)[:shots] if shots_data and shots else []
    if len(shot_problems) < shots:
        raise WorkloadError(f"--shots {shots}: {shots_data} has only {len(shot_problems)}")
    prompt_style: PromptStyle = "chat" if style == "chat" else "completion"
    items = gsm8k_items(problems, shot_problems, prompt_style, max_tokens)

    def score(its: Sequence[WorkItem], rows: Sequence[RequestResult]) -> AccuracyResult:
        return score_gsm8k(its, rows, shots=shots, style=prompt_style, data=str(data))

    return items, score


def run(
    model: Annotated[str | None, typer.Argument(
        help="With --engine: checkpoint folder, hub id, known shape (with --dummy) or tiny-moe "
             "(the default).")] = None,
    url: Annotated[str | None, typer.Option(
        help="An OpenAI-compatible server's base URL, e.g. http://127.0.0.1:8000/v1.")] = None,
    server_model: Annotated[str | None, typer.Option(
        "--model", help="With --url: the model name the server serves.")] = None,
    engine: Annotated[str | None, typer.Option(
        help=f"In-process engine: {', '.join(ENGINES)} (needs that package installed).")] = None,
    api_key: Annotated[str | None, typer.Option(
        help="Bearer token for the server (default: $OPENAI_API_KEY).")] = None,
    label: Annotated[str | None, typer.Option(
        help="With --url: the system's name in the record and the report (default: "
             "'<url> <model>'), e.g. 'llama.cpp b1234'.")] = None,
    workload: Annotated[Path | None, typer.Option(
        help="JSONL of requests: prompt or messages, optional id and max_tokens.")] = None,
    input_len: Annotated[str | None, typer.Option(
        help="Synthetic workload: prompt length N, uniform:LOW:HIGH or normal:MEAN:STD.")] = None,
    output_len: Annotated[str, typer.Option(
        help="Synthetic workload: output length (exact: ignore_eos).")] = "128",
    num_prompts: Annotated[int, typer.Option(help="Synthetic workload: prompts.")] = 100,
    task: Annotated[str | None, typer.Option(
        help=f"Accuracy task: {', '.join(TASKS)} (with --data).")] = None,
    data: Annotated[Path | None, typer.Option(
        help="The task's local data: GSM8K JSONL, a text file, or a multiple-choice JSONL.")
    ] = None,
    shots: Annotated[int, typer.Option(help="GSM8K: worked examples before each problem.")] = 0,
    shots_data: Annotated[Path | None, typer.Option(
        help="GSM8K: where the worked examples come from (e.g. the train split).")] = None,
    prompt_style: Annotated[str, typer.Option(
        help="GSM8K: chat (chat template) or completion (Question:/Answer: text).")] = "chat",
    limit: Annotated[int | None, typer.Option(help="GSM8K: score the first N problems.")] = None,
    seq_len: Annotated[int, typer.Option(
        help="Perplexity: scored tokens per window.")] = 256,
    concurrency: Annotated[int | None, typer.Option(
        help="Closed loop: clients back to back (default 1); with --rate: the cap in flight.")
    ] = None,
    rate: Annotated[float | None, typer.Option(
        help="Open loop: Poisson arrivals, requests per second.")] = None,
    requests: Annotated[int | None, typer.Option(
        help="Requests to send (the workload cycles; default: each once).")] = None,
    duration: Annotated[float | None, typer.Option(
        help="Send for this many seconds, then wait for those in flight.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of arrivals and synthetic prompts.")] = 0,
    max_tokens: Annotated[int, typer.Option(
        help="Output limit of requests that set none.")] = 128,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.0,
    slo_ttft: Annotated[float | None, typer.Option(
        help="Goodput SLO: most seconds to the first token.")] = None,
    slo_tpot: Annotated[float | None, typer.Option(
        help="Goodput SLO: most seconds per output token after the first.")] = None,
    out: Annotated[Path, typer.Option(
        help="The run record (JSON); rows go to <name>.requests.jsonl beside it.")
    ] = Path("moe-cap-run.json"),
    device: Annotated[str, typer.Option(help="Engines: cpu or cuda.")] = "cpu",
    dtype: Annotated[str | None, typer.Option(
        help="Engines: model dtype (default: float32 on the CPU); servers: the weights' "
             "format for cost and bounds (default bf16).")] = None,
    dummy: Annotated[bool, typer.Option(help="Engines: random weights of the shapes.")] = False,
    num_layers: Annotated[int | None, typer.Option(
        help="Keep (engines) or say the server kept (servers) the first N layers.")] = None,
    gpu_memory: Annotated[str | None, typer.Option(
        help="moe-gen: the GPU memory budget (e.g. 16GiB).")] = None,
    expert_memory: Annotated[str | None, typer.Option(
        help="moe-infinity: GPU memory for expert slots (experts offloaded to host memory).")
    ] = None,
    fetch: Annotated[str, typer.Option(
        help="moe-infinity, with --expert-memory: copy (misses copied into the cache) or mapped "
             "(the GPU reads decode misses from pinned host memory, no host sync per layer).")
    ] = "copy",
    lanes: Annotated[int, typer.Option(
        help="moe-infinity, with --fetch mapped: 1, or 2 (the CPU computes a share of each "
             "layer's misses at the same time).")] = 1,
    prefill: Annotated[str, typer.Option(
        help="moe-infinity, with --expert-memory: admit (prompts copy their misses into the "
             "cache, evicting others) or stream (through a small ring of staging slots at the "
             "link's rate, none admitted).")] = "admit",
    expert_dtype: Annotated[str | None, typer.Option(
        help="fp8: store and stream the routed experts as e4m3 with a scale per output channel "
             "(half of bf16's PCIe bytes; dequantised on the device; default: the model dtype); "
             "moe-infinity with --expert-memory, or moe-gen; servers: say the server's experts "
             "are fp8 (moe-infinity serve --expert-dtype fp8), for the record.")] = None,
    routing: Annotated[str | None, typer.Option(
        help="Engines: benchmark routing, uniform (uniform random top-k), "
             "zipf:s=S,reuse=R or replay:TRACES (dummy weights otherwise route every decode "
             "token to the same experts; moe-gen seeds it with --seed); a server sets its own "
             "(moe-infinity serve --routing).")
    ] = None,
    gpu: Annotated[str | None, typer.Option(
        help="GPU for the record (hardware-table name; default: this machine's, 'none' "
             "without CUDA).")] = None,
    cpu: Annotated[str | None, typer.Option(help="Host CPU for the cost model.")] = None,
    dram_gib: Annotated[float | None, typer.Option(
        help="Host memory charged, GiB.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run record as JSON.")
    ] = False,
) -> None:
    """Drive a workload against a server or an in-process engine and measure it: TTFT, TPOT,
    ITL and e2e percentiles, throughput, goodput, accuracy; writes a run record."""
    if task is not None and task not in TASKS:
        raise WorkloadError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    if engine is None and model is not None:
        raise WorkloadError(f"MODEL ({model!r}) is for --engine; a server's is --model NAME")
    options: dict[str, Any] = {"device": device, "dtype": dtype, "dummy": dummy,
               "num_layers": num_layers,
               "gpu_memory_bytes": None if gpu_memory is None else parse_bytes(gpu_memory),
               "expert_memory_bytes": None if expert_memory is None
               else parse_bytes(expert_memory), "fetch": fetch, "lanes": lanes,
               "prefill": prefill, "expert_dtype": expert_dtype, "routing": routing}
    check_expert_dtype(expert_dtype)
    if url is not None and (routing is not None or fetch != "copy" or lanes != 1
                            or prefill != "admit"):
        raise WorkloadError("--routing, --fetch, --lanes and --prefill are for --engine; a "
                            "server sets its own (e.g. moe-infinity serve --routing uniform)")
    target = _target(url, server_model or model, engine, api_key, options, label)
    if task in ("perplexity", "choice"):
        if data is None:
            raise WorkloadError(f"--task {task} needs --data FILE")
        record = run_scoring(target, ScoringConfig(
            task=task, data=data, record_path=out, seq_len=seq_len,  # type: ignore[arg-type]
            weight_dtype=dtype or "bf16", gpu=gpu, cpu=cpu, dram_gib=dram_gib))
    else:
        items, scorer = _workload(workload, task, data, input_len, output_len, num_prompts, seed,
                                  shots, shots_data, prompt_style, limit,
                                  max_tokens)
        load = LoadPattern(concurrency=concurrency if concurrency is not None
                           else (None if rate is not None else 1), rate_per_s=rate,
                           num_requests=requests, duration_s=duration, seed=seed)
        config = RunConfig(record_path=out, load=load,
                           settings=GenerationSettings(max_tokens=max_tokens,
                                                       temperature=temperature, seed=seed),
                           slo=Slo(slo_ttft, slo_tpot), weight_dtype=dtype or "bf16",
                           expert_dtype=expert_dtype,
                           num_layers=num_layers if isinstance(target, ServerSpec) else None,
                           gpu=gpu, cpu=cpu, dram_gib=dram_gib, scorer=scorer)
        bar = _Bar()
        try:
            record = run_benchmark(target, items, config, bar).record
        finally:
            bar.bar.stop()
    if as_json:
        json.dump(record.to_dict(), sys.stdout)
        sys.stdout.write("\n")
    else:
        print_run(view_run(record, load_hardware_table()), str(out))
