"""`moe-cap run` as a library call: drive a workload against a server or an in-process engine,
write the per-request rows as they come and one run record at the end (also when interrupted:
the record then covers what was measured and says `interrupted`)."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from moe_core import check_output_path

from moe_cap.accuracy_result import AccuracyResult
from moe_cap.core_engine import CoreStreamingEngine, gpu_name
from moe_cap.energy import NvmlEnergyMeter
from moe_cap.engine_options import EngineOptions
from moe_cap.engines import moe_gen_engine, moe_infinity_engine
from moe_cap.errors import TargetError
from moe_cap.interruptible import run_interruptible
from moe_cap.latency_stats import Slo
from moe_cap.load_pattern import LoadPattern
from moe_cap.openai_target import OpenAITarget
from moe_cap.request_result import RequestResult
from moe_cap.rows_file import RowsFile, rows_path_for
from moe_cap.run_record import RunRecord, StepRecord
from moe_cap.runner import drive, measured
from moe_cap.serving_summary import summarise_requests
from moe_cap.streaming_engine import EngineTarget
from moe_cap.target import Completion, GenerationSettings, Target
from moe_cap.workload import WorkItem

__all__ = ["Progress", "RunConfig", "RunOutcome", "Scorer", "ServerSpec", "run_benchmark"]

Scorer = Callable[[Sequence[WorkItem], Sequence[RequestResult]], AccuracyResult]


class Progress:
    """Callbacks a front end implements (the CLI: a progress bar); these do nothing."""

    def start(self, total: int | None, duration_s: float | None) -> None:
        """The run begins: `total` requests, or for `duration_s` seconds."""

    def advance(self, row: RequestResult) -> None:
        """A request ended."""


@dataclass(frozen=True)
class ServerSpec:
    """An OpenAI-compatible server.

    Attributes:
        url: Base URL ending in `/v1`.
        model: Model name sent in each request.
        api_key: Bearer token, if the server needs one.
        label: The record's engine, the system a report names (default `<url> <model>`:
            e.g. `llama.cpp 0c1e5709` tells a peer from our server on another port).
    """

    url: str
    model: str
    api_key: str | None = None
    label: str | None = None

    @property
    def is_local(self) -> bool:
        """Whether the server runs on this machine (so its GPU energy can be read here)."""
        return urlparse(self.url).hostname in ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Everything a run needs besides its target and workload.

    Attributes:
        record_path: The run record to write (JSON).
        load: Closed or open loop, count or duration.
        settings: Output limit, temperature, seed.
        slo: Goodput objective.
        rows_path: Per-request rows (default: `<record>.requests.jsonl`).
        weight_dtype, kv_dtype: What a server runs (engines report their own).
        expert_dtype: A server's routed experts' storage when not `weight_dtype` (`fp8`;
            engines report their own).
        num_layers: A server's truncated layer count (engines report their own).
        gpu: Hardware-table GPU (default: this machine's, `none` without CUDA).
        cpu, dram_gib: Host CPU and memory, for the cost model.
        scorer: Scores the answers of an accuracy task (None: a plain workload).
    """

    record_path: Path
    load: LoadPattern = field(default_factory=LoadPattern)
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    slo: Slo = field(default_factory=Slo)
    rows_path: Path | None = None
    weight_dtype: str = "bf16"
    kv_dtype: str | None = None
    expert_dtype: str | None = None
    num_layers: int | None = None
    gpu: str | None = None
    cpu: str | None = None
    dram_gib: float | None = None
    scorer: Scorer | None = None

    @property
    def rows(self) -> Path:
        """Where the per-request rows go."""
        return self.rows_path or rows_path_for(self.record_path)


@dataclass
class RunOutcome:
    """What a run produced.

    Attributes:
        record: The run record written.
        rows: Every request's row.
    """

    record: RunRecord
    rows: list[RequestResult]


@dataclass
class _Measured:
    """What a run gathered so far (kept across an interruption)."""

    rows: list[RequestResult] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    wall_s: float | None = None
    steps: list[StepRecord] = field(default_factory=list)
    counters: dict[str, float] = field(default_factory=dict)
    engine_record: RunRecord | None = None
    meter: NvmlEnergyMeter | None = None
    label: str = ""
    model: str = ""
    weight_dtype: str = "bf16"
    expert_dtype: str | None = None
    num_layers: int | None = None
    gpu: str | None = None
    routing: str | None = None

    def elapsed(self) -> float:
        return self.wall_s if self.wall_s is not None else time.perf_counter() - self.started

    def start_energy(self) -> None:
        """Read the GPU's energy counter from now (generation starts; loading is over)."""
        if self.meter is None:
            self.meter = NvmlEnergyMeter().__enter__()

    def stop_energy(self) -> float | None:
        """Joules since `start_energy` (None: not started, or NVML cannot measure)."""
        if self.meter is None:
            return None
        if self.meter.joules is None:
            self.meter.__exit__(None, None, None)
        return self.meter.joules


def _record(measured_: _Measured, config: RunConfig, items: Sequence[WorkItem], kind: str,
            energy_j: float | None, interrupted: bool) -> RunRecord:
    """The run record of what was measured."""
    rows = sorted(measured_.rows, key=lambda r: r.index)
    good = [r for r in rows if r.ok]
    if not good:
        first = rows[0].error if rows else "none was sent"
        raise TargetError(f"no request succeeded ({len(rows)} sent): {first}")
    base = measured_.engine_record
    wall = max(measured_.elapsed(), base.wall_seconds if base else 0.0,
               sum(s.seconds for s in measured_.steps), 1e-9)
    serving = summarise_requests(rows, target_kind=kind, load=config.load.to_dict(),
                                 duration_s=measured_.elapsed(), slo=config.slo,
                                 interrupted=interrupted, requests_file=str(config.rows))
    accuracy = config.scorer(items, rows) if config.scorer is not None and not interrupted \
        else None
    steps = tuple(base.steps) if base else tuple(measured_.steps)
    gpu = config.gpu or measured_.gpu or gpu_name("cuda" if _has_cuda() else "cpu")
    return RunRecord(
        engine=measured_.label, model=measured_.model, weight_dtype=measured_.weight_dtype,
        kv_dtype=config.kv_dtype or measured_.weight_dtype, gpu=gpu, wall_seconds=wall,
        expert_dtype=measured_.expert_dtype,
        input_tokens=sum(r.prompt_tokens or 0 for r in good),
        output_tokens=sum(r.output_tokens for r in good), steps=steps,
        num_layers=measured_.num_layers, cpu=config.cpu, dram_gib=config.dram_gib,
        gpu_energy_j=energy_j, energy_source="nvml" if energy_j is not None else "tdp",
        counters=measured_.counters or None, routing=measured_.routing, serving=serving,
        accuracy=accuracy)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


async def _drive_target(target: Target, items: Sequence[WorkItem], config: RunConfig,
                        keep: Callable[[RequestResult], None], gathered: _Measured) -> None:
    server = target if isinstance(target, OpenAITarget) else None
    try:
        if server is not None:
            await server.check()
        before = await server.metrics() if server is not None else None
        gathered.start_energy()
        gathered.started = time.perf_counter()
        gathered.wall_s = await drive(target, items, config.load, config.settings, keep)
        gathered.stop_energy()
        if server is not None:
            gathered.counters = server.metric_deltas(before, await server.metrics())
    finally:
        await target.aclose()


def run_benchmark(target: ServerSpec | EngineOptions, items: Sequence[WorkItem],
                  config: RunConfig, progress: Progress | None = None) -> RunOutcome:
    """Run `items` against `target` under `config`; write the rows and the record.

    Raises:
        TargetError: the server cannot be reached, the engine is not installed, or no request
            succeeded.
        WorkloadError / OutputError: a bad setting or output path (before any work).
    """
    progress = progress or Progress()
    check_output_path(config.record_path, "the run record")
    if isinstance(target, EngineOptions) and target.engine == "moe-gen" and (
            config.load.rate_per_s is not None or config.load.duration_s is not None):
        raise TargetError("moe-gen is an offline engine: it takes the whole workload at once, "
                          "so --rate and --duration do not apply (use --requests)")
    gathered = _Measured()
    local = not isinstance(target, ServerSpec) or target.is_local
    kind = "server" if isinstance(target, ServerSpec) else (
        "offline" if target.engine == "moe-gen" else "engine")
    completed = False
    with RowsFile(config.rows) as rows_file:
        def keep(row: RequestResult) -> None:
            gathered.rows.append(row)
            rows_file.write(row)
            progress.advance(row)

        try:
            if isinstance(target, ServerSpec):
                _run_server(target, items, config, keep, gathered, progress)
            elif target.engine == "moe-gen":
                _run_offline(target, items, config, keep, gathered, progress)
            else:
                _run_streaming(target, items, config, keep, gathered, progress)
            completed = True
        finally:
            energy = gathered.stop_energy() if local else None
            if not completed and any(r.ok for r in gathered.rows):
                # Interrupted (or failed): keep what was measured, then let the cause through.
                _record(gathered, config, items, kind, energy, True).to_json(config.record_path)
    record = _record(gathered, config, items, kind, energy, False)
    record.to_json(config.record_path)
    return RunOutcome(record, sorted(gathered.rows, key=lambda r: r.index))


def _total(items: Sequence[WorkItem], load: LoadPattern) -> int | None:
    if load.num_requests is not None:
        return load.num_requests
    return None if load.duration_s is not None else len(items)


def _run_server(spec: ServerSpec, items: Sequence[WorkItem], config: RunConfig,
                keep: Callable[[RequestResult], None], gathered: _Measured,
                progress: Progress) -> None:
    target = OpenAITarget(spec.url, spec.model, spec.api_key)
    gathered.label, gathered.model = spec.label or target.label, spec.model
    gathered.weight_dtype, gathered.num_layers = config.weight_dtype, config.num_layers
    gathered.expert_dtype = config.expert_dtype
    progress.start(_total(items, config.load), config.load.duration_s)
    run_interruptible(_drive_target(target, items, config, keep, gathered))


def _run_streaming(options: EngineOptions, items: Sequence[WorkItem], config: RunConfig,
                   keep: Callable[[RequestResult], None], gathered: _Measured,
                   progress: Progress) -> None:
    engine = moe_infinity_engine(options)
    if isinstance(engine, CoreStreamingEngine):
        engine.check(items, config.settings)  # every request fits before any runs
    info = engine.info
    gathered.label, gathered.model, gathered.gpu = info.label, info.model, info.gpu
    gathered.weight_dtype, gathered.num_layers = info.weight_dtype, info.num_layers
    gathered.expert_dtype, gathered.routing = info.expert_dtype, options.routing
    target = EngineTarget(engine)
    progress.start(_total(items, config.load), config.load.duration_s)
    try:
        run_interruptible(_drive_target(target, items, config, keep, gathered))
    finally:
        target.close()
        gathered.steps, gathered.counters = engine.steps(), engine.counters()


def _run_offline(options: EngineOptions, items: Sequence[WorkItem], config: RunConfig,
                 keep: Callable[[RequestResult], None], gathered: _Measured,
                 progress: Progress) -> None:
    engine = moe_gen_engine(options)
    count = config.load.num_requests or len(items)
    todo = [items[i % len(items)] for i in range(count)]
    gathered.label, gathered.model, gathered.num_layers = engine.label, options.model, \
        options.num_layers
    gathered.routing = options.routing
    progress.start(count, None)

    def finished(index: int, completion: Completion, seconds: float) -> None:
        # Offline: every request is in the job from its first step; no token is streamed.
        keep(measured(todo[index], index, 0.0, 0.0, seconds, completion, None))

    with tempfile.TemporaryDirectory(prefix="moe-cap-moe-gen-") as workdir:
        try:
            record, info = engine.run(todo, config.settings, Path(workdir), finished,
                                      gathered.start_energy)
        finally:
            # The job's duration: its first step to its last result (loading not counted).
            gathered.wall_s = max((r.e2e_s or 0.0 for r in gathered.rows), default=0.0)
            gathered.stop_energy()
    gathered.engine_record = record
    gathered.weight_dtype, gathered.gpu = info.weight_dtype, info.gpu
    gathered.expert_dtype = info.expert_dtype
