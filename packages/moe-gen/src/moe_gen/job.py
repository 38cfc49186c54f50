"""A generation job: read requests, skip those already done, plan, load, run, write each result as
it finishes, and sum up what happened (the summary, the report and moe-cap's run record)."""

from __future__ import annotations

import resource
from collections.abc import Callable
from dataclasses import dataclass

import torch
from moe_core import ModelSpec, resolve_model_path

from moe_gen.batch_loop import StepStats
from moe_gen.host_machine import cpu_model, cpu_table_name, gpu_name, host_memory_bytes
from moe_gen.job_config import JobConfig, RayConfig, sample_input
from moe_gen.job_engine import JobEngine, job_shape, job_tokenizer, plan_job
from moe_gen.job_record import JobRecord
from moe_gen.model_setup import load_for_generation
from moe_gen.output_file import JobOutput
from moe_gen.plan import Plan
from moe_gen.profile import DeviceProfile
from moe_gen.prompt_checks import checked_requests
from moe_gen.requests import GenRequest, read_requests
from moe_gen.run_record import run_record
from moe_gen.sequence import GenResult
from moe_gen.summary import JobSummary, summarise

__all__ = ["JobConfig", "JobOutcome", "JobRun", "RayConfig", "plan_job", "run_job", "sample_input"]


@dataclass
class JobOutcome:
    """What a job did.

    Attributes:
        summary: Throughput and counters.
        plan: The plan it ran (None when nothing was left to run).
        profile: The device profile the planner used (None with a fixed plan).
        dtype: The dtype the model ran in.
        record: moe-cap's run record of the job, all its runs (None when none ran a step).
        skipped: Requests already in the output.
        expert_dtype: The routed experts' storage when it is not the model dtype (`"fp8"`).
        num_engines: Engines that ran requests (more than one only on Ray).
        routing: The benchmark routing the engines ran (None: the model's own routers).
    """

    summary: JobSummary
    plan: Plan | None
    profile: DeviceProfile | None
    dtype: torch.dtype
    record: dict[str, object] | None
    skipped: int
    expert_dtype: str | None = None
    num_engines: int = 1
    routing: str | None = None


def run_job(config: JobConfig, on_start: Callable[[int, int], None] = lambda total, done: None,
            on_result: Callable[[GenResult], None] = lambda _: None,
            on_step: Callable[[StepStats], None] = lambda _: None) -> JobOutcome:
    """Run the job to the end (rerun it to resume after an interruption).

    Every request is read and checked (`checked_requests`) and the output locked and checked
    (`JobOutput`) before the model loads, so a bad input stops the job before any work.

    Raises:
        MoEError: user mistakes (bad input, model, budget, output), before the model loads.
    """
    requests = read_requests(config.input)
    with JobOutput(config.output) as output:
        record = JobRecord(config.output, fresh=not output.finished)
        todo = [(i, r) for i, r in enumerate(requests) if r.id not in output.finished]
        folder = resolve_model_path(config.model, weights=False)
        spec = ModelSpec.from_pretrained(folder)
        tokenizer = job_tokenizer(folder, spec.vocab_size if config.dummy else None)
        dtype = config.run_dtype(spec)
        todo = checked_requests(todo, tokenizer, spec.max_position_embeddings,
                                config.defaults.max_new_tokens, config.truncate, config.input,
                                spec.vocab_size)
        on_start(len(requests), len(requests) - len(todo))
        run = _job_run(config, dtype, output, on_result, on_step)
        try:
            if todo:
                run.generate(todo, tokenizer)
        finally:
            this_run = run.record()
            record.save(record.joined(this_run))
    return JobOutcome(run.summary(len(todo)), run.plan, run.profile, dtype,
                      record.joined(this_run), len(requests) - len(todo), config.expert_dtype,
                      run.num_engines, config.routing)


def _job_run(config: JobConfig, dtype: torch.dtype, output: JobOutput,
             on_result: Callable[[GenResult], None],
             on_step: Callable[[StepStats], None]) -> JobRun:
    """The run of `config`: in this process, or on Ray (imported only then: an optional
    extra)."""
    if config.ray is None:
        return JobRun(config, dtype, output, on_result, on_step)
    from moe_gen.ray_job import RayJobRun

    return RayJobRun(config, dtype, output, on_result, on_step)


class JobRun:
    """One run of a job: load, plan, generate in this process; what it measured. A job on Ray
    runs `moe_gen.ray_job.RayJobRun`, which generates on engine actors and keeps the same
    measures.

    Attributes:
        config: The job.
        dtype: The dtype the model runs in.
        plan: The plan run (None until planned).
        profile: The profile it was planned from (None with a fixed plan).
        steps: Every step of every engine.
        offload: Offload counters (`bytes_copied`, `stall_seconds`, ...).
        wall: Wall time of the generation.
        engine_seconds: The engines' wall times added up (the run record's wall time; more
            than `wall` when engines run side by side).
        energy: Measured energy (None values: not measured).
        gpu: The GPU as moe-cap's hardware table names it (None: this process's).
        host_memory_bytes: Host memory charged to one engine (its share of the budget).
        num_engines: Engines that ran requests.
    """

    def __init__(self, config: JobConfig, dtype: torch.dtype, output: JobOutput,
                 on_result: Callable[[GenResult], None],
                 on_step: Callable[[StepStats], None]) -> None:
        self.config = config
        self.dtype = dtype
        self.plan = config.plan
        self.profile: DeviceProfile | None = None
        self.steps: list[StepStats] = []
        self.offload: dict[str, int | float] = {}
        self.wall = 0.0
        self.engine_seconds = 0.0
        self.energy: dict[str, float | None] = {}
        self.gpu: str | None = None
        self.host_memory_bytes = config.host_memory_bytes
        self.num_engines = 1
        self._output, self._on_result, self._on_step = output, on_result, on_step

    def generate(self, todo: list[tuple[int, GenRequest]], tokenizer: object | None) -> None:
        """Load the model, plan, and run `todo` (requests with token-id prompts)."""
        config = self.config
        model = load_for_generation(config.model, config.device, self.dtype,
                                    dummy=config.dummy, num_layers=config.num_layers)
        if config.plan is None:
            self.plan, self.profile = plan_job(
                config, model.spec, *job_shape(todo, config.defaults.max_new_tokens), len(todo))
        assert self.plan is not None
        engine = JobEngine(config, model, self.plan)
        try:
            engine.run(todo, tokenizer, self.finished, self.stepped)
        finally:
            self.wall = self.engine_seconds = engine.wall_s
            self.energy = engine.energy_j
            self.offload = engine.offload

    def finished(self, result: GenResult) -> None:
        """Write a finished request's result (and tell the caller)."""
        self._output.write(result)
        self._on_result(result)

    def stepped(self, stats: StepStats) -> None:
        """Keep a step's measures (and tell the caller)."""
        self.steps.append(stats)
        self._on_step(stats)

    def peak_host_bytes(self) -> int | None:
        """This process's peak resident host memory (None: it ran no step)."""
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
                if self.steps else None)

    def summary(self, requests: int) -> JobSummary:
        """Throughput and counters of this run."""
        return summarise(requests, self.steps, self.wall, self.offload, self.plan,
                         self.peak_host_bytes())

    def record(self) -> dict[str, object] | None:
        """moe-cap's run record of this run (None when it ran no step).

        With several engines it is counted in engine-seconds: every engine's steps, their
        wall times added up, one GPU and one engine's share of host memory, so that moe-cap's
        cost, throughput and utilisation are per engine-hour (docs/moe-gen.md, "On Ray").
        """
        config = self.config
        if not self.steps:
            return None
        record = run_record(config.model, self.dtype, self.gpu or gpu_name(config.device),
                            self.engine_seconds, self.steps, config.num_layers,
                            config.expert_dtype, config.routing)
        model = cpu_model()
        if model is not None:
            record["cpu"] = cpu_table_name(model)
        memory = host_memory_bytes()
        # The host memory charged: the budget, or the machine's memory if that is less.
        charged = self.host_memory_bytes if memory is None else min(memory,
                                                                    self.host_memory_bytes)
        record["dram_gib"] = round(charged / 2**30, 3)
        record.update({k: v for k, v in self.energy.items() if v is not None})
        return record

