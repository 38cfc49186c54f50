"""`moe-infinity`: serving (`serve`, `chat`), activation tracing and cache simulation.

Thin commands: each parses its options, builds a config, calls one library function and prints.
Results go to stdout (`--json`: one JSON object); progress and notes to stderr; user mistakes
are one line on stderr and exit status 1.
"""

from __future__ import annotations

import gc
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import moe_core
import typer
from moe_core import (
    TINY_MODEL_NAME,
    ModelSpec,
    SettingError,
    StagedOutput,
    check_device,
    check_output_path,
    parse_truncate,
    tool_app,
)
from rich.console import Console

import moe_infinity
from moe_infinity.evaluation import EvaluationPlan, evaluate
from moe_infinity.policy_setup import DEFAULT_POLICIES, parse_policies
from moe_infinity.prompts import read_prompts
from moe_infinity.render import plot_hit_rates, print_report, report_dict
from moe_infinity.serving.engine_setup import EngineSettings, resolve_device
from moe_infinity.serving.expert_settings import ExpertSettings
from moe_infinity.serving.runtime_policy import parse_serve_policy
from moe_infinity.trace_file import load_traces, save_traces
from moe_infinity.trace_run import TraceConfig, checked_prompts

__all__ = ["app"]

app = tool_app(
    "moe-infinity", moe_infinity.__version__,
    "moe-infinity: activation-aware expert offloading: serve, chat, trace requests, simulate "
    "caches.", [
        "moe-infinity serve --gpu-memory 16GiB --port 8000    (tiny-moe; OpenAI API at /v1)",
        "moe-infinity serve path/to/model --policy lru --traces traces.collection --api-key KEY",
        "moe-infinity chat    (the same engine in the terminal)",
        "moe-infinity serve qwen3-30b-a3b --dummy --num-layers 24 --routing uniform "
        "--fetch mapped --port 0    (benchmark S3)",
        "moe-infinity trace --input prompts.jsonl --output traces.bin    (tiny-moe, on the CPU)",
        "moe-infinity simulate traces.bin --cache-fraction 0.1,0.25 --plot hit-rate.png",
    ], runtime_version=moe_core.__version__)
_err = Console(stderr=True)
AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]


def _emit(data: object) -> None:
    json.dump(data, sys.stdout)
    sys.stdout.write("\n")


def _fractions(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise SettingError(f"--cache-fraction takes comma-separated numbers, got {text!r}"
                           ) from None
    if not values:
        raise SettingError("--cache-fraction needs at least one value")
    return values


@app.command()
def version() -> None:
    """Print the versions of moe-infinity and the moe-core runtime (as --version does)."""
    typer.echo(f"moe-infinity {moe_infinity.__version__} (moe-core {moe_core.__version__})")


@app.command()
def trace(
    model: Annotated[str, typer.Argument(
        help=f"Checkpoint folder, hub id, or {TINY_MODEL_NAME} (the embedded model, the "
        "default).")] = TINY_MODEL_NAME,
    input_path: Annotated[Path, typer.Option(
        "--input", help="Prompts, JSONL: {\"prompt\": ...} or {\"messages\": [...]}, optional "
        "\"id\", \"domain\", \"max_new_tokens\".")] = Path("prompts.jsonl"),
    output: Annotated[Path, typer.Option(help="Trace file to write.")] = Path("traces.bin"),
    max_new_tokens: Annotated[int, typer.Option(help="Tokens generated per prompt.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.0,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    device: Annotated[str, typer.Option(help="cpu, cuda, ...")] = "cpu",
    dtype: Annotated[str | None, typer.Option(
        help="float32, bfloat16 or float16 (default: float32 on the CPU, where bf16 matrix "
        "products are slow; else the checkpoint's).")] = None,
    expert_dtype: Annotated[str, typer.Option(
        help="Format experts cross PCIe in (sets bytes per expert).")] = "bfloat16",
    lookahead_input: Annotated[str, typer.Option(
        help="What layer l+1's router sees for the lookahead: next_norm (layer l's residual "
        "stream under layer l+1's norm) or block_input (layer l's MoE-block input).")
    ] = "next_norm",
    truncate: Annotated[str | None, typer.Option(
        help="A prompt too long for the model's context (with its token limit): left drops "
             "its start, right its end (default: refuse it before tracing starts).")] = None,
    as_json: AsJson = False,
) -> None:
    """Run prompts one at a time and record each request's expert activations.

    Every prompt is checked against the model's context before the model loads.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from moe_infinity.trace_run import trace_prompts

    config = TraceConfig(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                         lookahead_input=lookahead_input,  # type: ignore[arg-type]
                         expert_dtype=expert_dtype)
    sides = parse_truncate(truncate)
    prompts = read_prompts(input_path)
    check_device(device)
    with StagedOutput(output, "--output") as staged:
        folder = moe_core.resolve_model_path(model, weights=False)
        tokenizer = moe_core.load_tokenizer(folder)
        prompts = checked_prompts(prompts, tokenizer,
                                  ModelSpec.from_pretrained(folder).max_position_embeddings,
                                  config, sides, input_path)
        net = moe_core.load_model(model, device=device, dtype=dtype)
        with Progress("{task.description}", BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=_err) as progress:
            task = progress.add_task("tracing", total=len(prompts))
            traces = trace_prompts(net, tokenizer, prompts, model, config,
                                   lambda done: progress.update(task, completed=done))
        save_traces(traces, staged.partial)
    summary = {"output": str(output), "requests": len(traces),
               "prompt_tokens": sum(t.num_prompt_tokens for t in traces),
               "decode_tokens": sum(t.num_decode_tokens for t in traces),
               "model": traces.shape.to_dict()}
    if as_json:
        _emit(summary)
    else:
        typer.echo(f"{summary['requests']} requests ({summary['prompt_tokens']} prompt tokens, "
                   f"{summary['decode_tokens']} decoded) -> {output}")


@app.command()
def simulate(
    traces_path: Annotated[Path, typer.Argument(help="Trace file from `moe-infinity trace`.")],
    cache_fraction: Annotated[str, typer.Option(
        help="Cache sizes as shares of all routed experts, comma-separated.")] = "0.1,0.25,0.5",
    policy: Annotated[str, typer.Option(
        help="Policies, comma-separated: EVICTION[+prefetch][-nolookahead] with EVICTION one "
        "of lru, lfu, aware, belady.")] = ",".join(DEFAULT_POLICIES),
    build_share: Annotated[float, typer.Option(
        help="Share of the requests (the first) that build the trace collection; the rest "
        "are replayed.")] = 0.5,
    capacity: Annotated[int | None, typer.Option(
        help="Collection capacity (default: all build requests).")] = None,
    prefetch_budget: Annotated[int | None, typer.Option(
        help="Experts prefetched per layer (default: the model's top-k).")] = None,
    pcie_gbps: Annotated[float, typer.Option(
        help="Host-to-GPU bandwidth, GB/s (default: measured on the H200 machine).")] = 54.7,
    plot: Annotated[Path | None, typer.Option(help="Write hit rate vs cache size (PNG).")] = None,
    collection_out: Annotated[Path | None, typer.Option(
        help="Also save the trace collection built from the build requests.")] = None,
    as_json: AsJson = False,
) -> None:
    """Replay traces through a simulated GPU expert cache under each policy and cache size."""
    if pcie_gbps <= 0:
        raise SettingError(f"--pcie-gbps must be positive, got {pcie_gbps}")
    for path, option in ((plot, "--plot"), (collection_out, "--collection-out")):
        if path is not None:
            check_output_path(path, option)
    plan = EvaluationPlan(cache_fractions=_fractions(cache_fraction),
                          policies=tuple(parse_policies(policy)), build_share=build_share,
                          capacity=capacity, prefetch_budget=prefetch_budget,
                          bandwidth_bytes_per_s=pcie_gbps * 1e9)
    traces = load_traces(traces_path)
    _err.print(f"{traces.shape.describe()}; {len(traces)} requests", highlight=False)
    report = evaluate(traces, plan, lambda r: _err.print(
        f"  {r.policy} at {r.cache_fraction:.0%}: hit rate {r.hit_rate:.1%}", highlight=False))
    if plot is not None:
        plot_hit_rates(report, plot)
    if collection_out is not None:
        report.collection.save(collection_out)
    if as_json:
        _emit({**report_dict(report, traces.shape), "plot": str(plot) if plot else None,
               "collection": str(collection_out) if collection_out else None})
    else:
        print_report(report, traces.shape)
        if plot is not None:
            _err.print(f"plot: {plot}", highlight=False)


Model = Annotated[str, typer.Argument(
    help=f"Checkpoint folder, hub id, or {TINY_MODEL_NAME} (the embedded model, the default).")]
GpuMemory = Annotated[str, typer.Option(
    help="The whole device budget: dense weights, KV pool and expert slots (e.g. 16GiB).")]
Device = Annotated[str, typer.Option(help="auto (a GPU if there is one), cpu, cuda, cuda:1 ...")]
Dtype = Annotated[str | None, typer.Option(
    help="float32, bfloat16 or float16 (default: float32 on the CPU, else the checkpoint's).")]
KvMemory = Annotated[str | None, typer.Option(
    help="KV pool size (default: a quarter of the budget left after the dense weights, at most "
         "--max-batch full contexts).")]
Policy = Annotated[str, typer.Option(
    help="Expert cache eviction: activation (activation-aware, fed by the trace collection), "
         "lru or lfu.")]
Prefetch = Annotated[str, typer.Option(
    help="none, or lookahead[:top=N]: each MoE layer's input also goes through the next layer's "
         "router, and that layer's likely experts are copied to the GPU before it routes.")]
Traces = Annotated[Path | None, typer.Option(
    help="Trace collection file: loaded at start if it exists, every request's expert "
         "activations added, saved atomically every --save-every requests and at shutdown.")]
SaveEvery = Annotated[int, typer.Option(help="Requests between saves of --traces (0: only at "
                                        "shutdown).")]
TraceCapacity = Annotated[int, typer.Option(help="Most requests a new trace collection keeps.")]
MaxBatch = Annotated[int, typer.Option(help="Most requests decoding or prefilling at once.")]
MaxQueue = Annotated[int, typer.Option(help="Most requests waiting; more get HTTP 429.")]
PrefillChunk = Annotated[int, typer.Option(
    help="Most prompt tokens prefilled per engine step while streams decode (long prompts do "
         "not stall them); 4x as many in a step with no stream.")]
Dummy = Annotated[bool, typer.Option(
    "--dummy", help="Random weights of the model's shapes (e.g. a shipped shape such as "
    "qwen3-30b-a3b; a shape without a tokenizer gets a word-level stand-in).")]
NumLayers = Annotated[int | None, typer.Option(help="Keep only the first N decoder layers.")]
ExpertDtype = Annotated[str | None, typer.Option(
    help="fp8: store and stream the routed experts as e4m3 with a scale per output channel "
         "(half of bf16's PCIe bytes; dequantised on the device; default: the model dtype).")]
Fetch = Annotated[str, typer.Option(
    help="copy (misses are copied into the cache, which the policy manages) or mapped (the GPU "
         "reads decode misses from pinned host memory, no host sync per layer; the cache holds "
         "the experts loaded at start).")]
Lanes = Annotated[int, typer.Option(
    help="With --fetch mapped: 1 (the GPU reads every miss) or 2 (each layer's misses are split "
         "between the GPU's reads and the CPU, which computes its share from host memory at "
         "the same time).")]
Prefill = Annotated[str, typer.Option(
    help="How prompt chunks treat experts missing from the cache: admit (copy them into the "
         "cache, evicting others) or stream (copy them through a small ring of staging slots, "
         "taken from the expert budget, at the link's rate while the others compute; the cache "
         "keeps what decode and prefetches put there).")]
Routing = Annotated[str | None, typer.Option(
    help="Benchmarks only: replace the routers by uniform (uniform random top-k), "
         "zipf:s=S,reuse=R (skewed, with temporal re-use) or replay:TRACES (a trace file); "
         "dummy weights otherwise route every decode token to the same experts.")]


def _engine_settings(model: str, gpu_memory: str, device: str, dtype: str | None,
                     kv_memory: str | None, policy: str, traces: Path | None, save_every: int,
                     trace_capacity: int, max_batch: int, max_queue: int, prefill_chunk: int,
                     prefetch: str, experts: ExpertSettings,
                     graphs: bool = True) -> EngineSettings:
    return EngineSettings(
        model=model, device=resolve_device(device), dtype=dtype,
        gpu_memory_bytes=_bytes(gpu_memory, "--gpu-memory"),
        kv_memory_bytes=None if kv_memory is None else _bytes(kv_memory, "--kv-memory"),
        policy=parse_serve_policy(policy), traces=traces, save_every=save_every,
        trace_capacity=trace_capacity, max_batch=max_batch, max_queue=max_queue,
        prefill_chunk=prefill_chunk, prefetch=prefetch, experts=experts, graphs=graphs)


def _experts(dummy: bool, num_layers: int | None, fetch: str, lanes: int,
             routing: str | None, expert_dtype: str | None, prefill: str) -> ExpertSettings:
    return ExpertSettings(dummy=dummy, num_layers=num_layers, expert_dtype=expert_dtype,
                          fetch=fetch,  # type: ignore[arg-type]  # checked by ExpertSettings
                          lanes=lanes, routing=routing,
                          prefill=prefill)  # type: ignore[arg-type]  # checked there too


def _expert_path(experts: ExpertSettings, eager_because: str | None) -> str:
    """How experts are stored, how they reach the GPU, how prompts treat misses and how decode
    runs, for the start-up line (FP8 experts are opt-in and never silent)."""
    stored = f"experts {experts.expert_dtype}, " if experts.expert_dtype else ""
    fetch = f"{stored}fetch {experts.fetch}" + (", 2 lanes" if experts.lanes == 2 else "")
    routing = f", routing {experts.routing}" if experts.routing else ""
    decode = "captured decode" if eager_because is None else f"eager decode ({eager_because})"
    return f"{fetch}, prefill {experts.prefill}, {decode}{routing}"


def _bytes(text: str, option: str) -> int:
    try:
        value = moe_core.parse_bytes(text)
    except ValueError as exc:
        raise SettingError(f"{option}: {exc}") from None
    if value <= 0:
        raise SettingError(f"{option} must be positive, got {text!r}")
    return value


@app.command()
def serve(
    model: Model = TINY_MODEL_NAME,
    gpu_memory: GpuMemory = "16GiB",
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0: any free port, named on stdout).")] = 8000,
    policy: Policy = "activation",
    prefetch: Prefetch = "none",
    traces: Traces = None,
    save_every: SaveEvery = 100,
    trace_capacity: TraceCapacity = 1000,
    max_batch: MaxBatch = 64,
    max_queue: MaxQueue = 256,
    prefill_chunk: PrefillChunk = 256,
    kv_memory: KvMemory = None,
    api_key: Annotated[str | None, typer.Option(
        envvar="MOE_INFINITY_API_KEY",
        help="Require `Authorization: Bearer KEY` on /v1/* (also from MOE_INFINITY_API_KEY).")
    ] = None,
    grace: Annotated[float, typer.Option(
        help="Seconds running requests get to finish after SIGTERM or SIGINT.")] = 30.0,
    served_model_name: Annotated[str | None, typer.Option(
        help="The model's name in the API (default: MODEL as given).")] = None,
    device: Device = "auto",
    dtype: Dtype = None,
    dummy: Dummy = False,
    num_layers: NumLayers = None,
    expert_dtype: ExpertDtype = None,
    fetch: Fetch = "copy",
    lanes: Lanes = 1,
    prefill: Prefill = "admit",
    routing: Routing = None,
    gpus: Annotated[str | None, typer.Option(
        help="Spread the expert cache over these GPUs, e.g. 0,1: one process per GPU, each "
             "holding its own share of the experts (expert parallel); --gpu-memory is per GPU.")
    ] = None,
    graphs: Annotated[bool, typer.Option(
        help="Replay decode passes from CUDA graphs (captured per batch size and context "
             "bucket) where the model allows it: on CUDA, one process, and an expert path that "
             "keeps routing on the device (--fetch mapped, or every expert resident).")] = True,
) -> None:
    """Serve MODEL over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions,
    /v1/models, /health, /metrics) with continuous batching and offloaded experts.

    Stops on SIGTERM or SIGINT: new requests are refused, running ones get --grace seconds,
    the trace collection is saved, and the exit status is 0.
    """
    from moe_infinity.serving.app import create_app
    from moe_infinity.serving.engine_setup import build_engine
    from moe_infinity.serving.http_server import bind_socket, run_server
    from moe_infinity.serving.rank_devices import parse_gpus
    from moe_infinity.serving.serving_metrics import ServingMetrics

    if grace < 0:
        raise SettingError(f"--grace must be >= 0, got {grace}")
    if api_key is not None and not api_key.strip():
        raise SettingError("--api-key must not be empty")
    settings = _engine_settings(model, gpu_memory, device, dtype, kv_memory, policy, traces,
                                save_every, trace_capacity, max_batch, max_queue, prefill_chunk,
                                prefetch,
                                _experts(dummy, num_layers, fetch, lanes, routing, expert_dtype,
                                         prefill),
                                graphs)
    if gpus is not None:  # `cpu:N` (N ranks on the CPU, over gloo) is for tests
        if prefill == "stream":  # a rank holds a shard: its misses are other ranks' experts
            raise SettingError("--prefill stream is not supported with --gpus (each rank's "
                               "cache holds only its share of the experts)")
        if routing is not None:  # each rank would draw its own routing
            raise SettingError("--routing is not supported with --gpus (every rank routes the "
                               "same tokens itself; set routing would differ between ranks)")
        ranks = parse_gpus(gpus, device)
        settings = replace(settings, device=ranks[0], rank_devices=ranks)
        _err.print(f"expert parallel: {len(ranks)} ranks on {', '.join(ranks)}", highlight=False)
    sock = bind_socket(host, port)
    engine = build_engine(settings)
    # The model, tokenizer and libraries are loaded for good: keep the garbage collector from
    # scanning them in every full collection, a pause every thread (the event loop's included)
    # would wait out.
    gc.collect()
    gc.freeze()
    metrics = ServingMetrics(engine.snapshot)
    engine.listener = metrics
    name = served_model_name or model
    app_ = create_app(engine, name, metrics, api_key)
    engine.start()
    bound_host, bound_port = sock.getsockname()[:2]
    memory = engine.served.memory
    _err.print(f"{name} on {settings.device}: dense {moe_core.format_bytes(memory.dense_bytes)}, "
               f"KV {moe_core.format_bytes(memory.kv_bytes)} ({engine.pool.num_blocks} blocks), "
               f"{engine.served.runtime.pool.num_slots} expert slots, policy {settings.policy}, "
               f"{_expert_path(settings.experts, engine.eager_decode_reason())}", highlight=False)
    typer.echo(f"serving {name} on http://{bound_host}:{bound_port}/v1", )
    sys.stdout.flush()
    try:
        run_server(app_, sock, grace, engine.stop_accepting, engine.cancel_all)
    finally:
        engine.stop()
        sock.close()
    saved = f"; traces saved to {traces}" if traces is not None else ""
    _err.print(f"stopped after {engine.keeper.num_added} requests{saved}", highlight=False)


@app.command()
def chat(
    model: Model = TINY_MODEL_NAME,
    gpu_memory: GpuMemory = "16GiB",
    policy: Policy = "activation",
    prefetch: Prefetch = "none",
    traces: Traces = None,
    max_tokens: Annotated[int, typer.Option(help="Most tokens per answer.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.7,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling threshold.")] = None,
    seed: Annotated[int | None, typer.Option(help="Sampling seed.")] = None,
    system: Annotated[str | None, typer.Option(help="A system message.")] = None,
    kv_memory: KvMemory = None,
    device: Device = "auto",
    dtype: Dtype = None,
    dummy: Dummy = False,
    num_layers: NumLayers = None,
    expert_dtype: ExpertDtype = None,
    fetch: Fetch = "copy",
    lanes: Lanes = 1,
    prefill: Prefill = "admit",
    routing: Routing = None,
) -> None:
    """Chat with MODEL in the terminal, through the serving engine in this process.

    Answers stream as they are generated; tokens per second and the expert cache's hit rate
    follow each one. /exit, Ctrl-D or Ctrl-C ends the chat.
    """
    from moe_infinity.serving.chat_session import ChatSession, run_chat
    from moe_infinity.serving.engine_setup import build_engine

    session = ChatSession(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                          seed=seed, system=system)
    settings = _engine_settings(model, gpu_memory, device, dtype, kv_memory, policy, traces,
                                100, 1000, 1, 1, 256, prefetch,
                                _experts(dummy, num_layers, fetch, lanes, routing, expert_dtype,
                                         prefill))
    engine = build_engine(settings)
    engine.start()
    try:
        run_chat(engine, session)
    finally:
        engine.stop()
