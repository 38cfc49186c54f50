"""A generation job: read requests, skip those already done, plan, load, run, write each result as
it finishes, and sum up what happened (the summary, the report and moe-cap's run record)."""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

import torch
from moe_core import (
    ConfigError,
    ModelSpec,
    MoEForCausalLM,
    SettingError,
    Truncate,
    check_device,
    load_tokenizer,
    resolve_model_path,
    run_dtype,
)

from moe_gen.api import Defaults, eos_ids, run_requests
from moe_gen.batch_loop import StepStats
from moe_gen.energy_meter import EnergyMeter
from moe_gen.host_machine import cpu_model, cpu_table_name, host_memory_bytes
from moe_gen.job_record import JobRecord
from moe_gen.model_setup import install_streaming, load_for_generation
from moe_gen.output_file import JobOutput
from moe_gen.plan import Plan
from moe_gen.planner import Budget, make_plan
from moe_gen.profile import DeviceProfile, profile_device
from moe_gen.prompt_checks import checked_requests
from moe_gen.requests import GenRequest, read_requests
from moe_gen.run_record import run_record
from moe_gen.sequence import GenResult
from moe_gen.summary import JobSummary, summarise

__all__ = ["JobConfig", "run_job", "sample_input"]


def sample_input() -> Path:
    """The embedded sample prompts (the default `--input`)."""
    return Path(str(resources.files("moe_gen") / "data" / "sample_prompts.jsonl"))


@dataclass(frozen=True, kw_only=True)
class JobConfig:
    """Everything a job needs.

    Attributes:
        model: Checkpoint folder, hub id, known shape (with `dummy`) or `tiny-moe`.
        input: Requests file (JSONL or plain text).
        output: Results JSONL (appended; finished ids are skipped).
        defaults: Generation settings requests may override.
        gpu_memory_bytes: Device memory budget of the whole process.
        host_memory_bytes: Host memory budget (expert store and KV pages).
        device: `"cuda"` or `"cpu"`.
        dtype: Model dtype (default: moe-core's rule, `moe_core.run_dtype`: float32 on the CPU,
            else the checkpoint's).
        dummy: Random weights of the model's shapes.
        num_layers: Keep the first N decoder layers.
        eos: Stop at EOS (False: always run to the token limit, benchmark style).
        plan: A fixed plan instead of the planner's.
        max_cpu_attention_share: The most of a decode batch the planner may attend on the host.
        truncate: Cut prompts too long for the model's context on this side (None: such a
            request stops the job before it starts).
        expert_dtype: `"fp8"`: routed experts stored and streamed as e4m3 with per-output-
            channel scales, dequantised on the device (never silent: the summary, the run
            record and the report say so); None: the model dtype.
    """

    model: str
    input: Path
    output: Path
    defaults: Defaults = field(default_factory=Defaults)
    gpu_memory_bytes: int = 12 << 30
    host_memory_bytes: int = 64 << 30
    device: str = "cpu"
    dtype: str | None = None
    dummy: bool = False
    num_layers: int | None = None
    eos: bool = True
    plan: Plan | None = None
    max_cpu_attention_share: float = 0.75
    truncate: Truncate | None = None
    expert_dtype: str | None = None

    def __post_init__(self) -> None:
        """Raises `SettingError` naming the option at fault, `DeviceError` for a missing GPU."""
        if self.device not in ("cpu", "cuda"):
            raise SettingError(f"--device must be cpu or cuda, got {self.device!r}")
        if self.gpu_memory_bytes <= 0 or self.host_memory_bytes <= 0:
            raise SettingError("--gpu-memory and --host-memory must be positive")
        if not 0.0 <= self.max_cpu_attention_share <= 1.0:
            raise SettingError(f"--max-cpu-attention-share must be in [0, 1], got "
                               f"{self.max_cpu_attention_share}")
        if self.expert_dtype not in (None, "fp8"):
            raise SettingError(f"--expert-dtype must be fp8 (or omitted: the model dtype), got "
                               f"{self.expert_dtype!r}")
        if self.num_layers is not None and self.num_layers < 1:
            raise SettingError(f"--num-layers must be at least 1, got {self.num_layers}")
        check_device(self.device)

    def run_dtype(self, spec: ModelSpec) -> torch.dtype:
        """The dtype the job runs `spec` in: `dtype`, else moe-core's rule for `device`."""
        return run_dtype(self.dtype, self.device, spec.torch_dtype)


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
    """

    summary: JobSummary
    plan: Plan | None
    profile: DeviceProfile | None
    dtype: torch.dtype
    record: dict[str, object] | None
    skipped: int
    expert_dtype: str | None = None


def _tokenizer(folder: Path, stand_in_vocab: int | None) -> object | None:
    try:
        # A dummy run of a shape without a tokenizer gets a word-level stand-in, so text
        # prompts (a benchmark's synthetic ones) run too.
        return load_tokenizer(folder, stand_in_vocab)
    except ConfigError:
        return None  # shapes and tiny test checkpoints have no tokenizer: token-id prompts only


def plan_job(config: JobConfig, spec: ModelSpec, prompt_tokens: int, max_new: int,
             num_requests: int) -> tuple[Plan, DeviceProfile]:
    """Profile the device and let the planner size the run."""
    dtype = config.run_dtype(spec)
    profile = profile_device(spec, config.device, dtype)
    reserve = 3 << 29 if config.device == "cuda" else 0  # 1.5 GiB: allocator slack, kernels
    budget = Budget(gpu_bytes=config.gpu_memory_bytes, host_bytes=config.host_memory_bytes,
                    prompt_tokens=prompt_tokens, max_new_tokens=max_new,
                    num_requests=num_requests, reserve_bytes=reserve,
                    max_cpu_attention_share=config.max_cpu_attention_share)
    return make_plan(spec, dtype, profile, budget, config.expert_dtype == "fp8"), profile


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
        tokenizer = _tokenizer(folder, spec.vocab_size if config.dummy else None)
        dtype = config.run_dtype(spec)
        todo = checked_requests(todo, tokenizer, spec.max_position_embeddings,
                                config.defaults.max_new_tokens, config.truncate, config.input,
                                spec.vocab_size)
        on_start(len(requests), len(requests) - len(todo))
        run = _Run(config, dtype, output, on_result, on_step)
        try:
            if todo:
                run.generate(todo, tokenizer)
        finally:
            this_run = run.record()
            record.save(record.joined(this_run))
    return JobOutcome(run.summary(len(todo)), run.plan, run.profile, dtype,
                      record.joined(this_run), len(requests) - len(todo), config.expert_dtype)


class _Run:
    """One run of a job: load, plan, generate; what it measured."""

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
        self.energy: dict[str, float | None] = {}
        self._output, self._on_result, self._on_step = output, on_result, on_step

    def generate(self, todo: list[tuple[int, GenRequest]], tokenizer: object | None) -> None:
        """Load the model, plan, and run `todo` (requests with token-id prompts)."""
        config = self.config
        model = load_for_generation(config.model, config.device, self.dtype,
                                    dummy=config.dummy, num_layers=config.num_layers)
        defaults = _defaults(config, model)
        longest = max(len(r.token_ids or ()) for _, r in todo)
        max_new = max(r.max_new_tokens or defaults.max_new_tokens for _, r in todo)
        if config.plan is None:
            self.plan, self.profile = plan_job(config, model.spec, longest, max_new, len(todo))
        assert self.plan is not None
        loaded = install_streaming(model, self.plan, config.device,
                                   fp8_experts=config.expert_dtype == "fp8")
        runtime = loaded.runtime
        started = time.perf_counter()
        meter = EnergyMeter(0 if config.device == "cuda" else None)
        try:
            with meter:
                run_requests(loaded.model, todo, self.plan, defaults, tokenizer, self._finished,
                             self._stepped,
                             (lambda: runtime.stats.bytes_copied) if runtime else (lambda: 0))
        finally:
            self.wall = time.perf_counter() - started
            self.energy = {"gpu_energy_j": meter.gpu_j, "cpu_energy_j": meter.cpu_j}
            self.offload = runtime.summary() if runtime is not None else {}

    def _finished(self, result: GenResult) -> None:
        self._output.write(result)
        self._on_result(result)

    def _stepped(self, stats: StepStats) -> None:
        self.steps.append(stats)
        self._on_step(stats)

    def summary(self, requests: int) -> JobSummary:
        """Throughput and counters of this run."""
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
                if self.steps else None)
        return summarise(requests, self.steps, self.wall, self.offload, self.plan, peak)

    def record(self) -> dict[str, object] | None:
        """moe-cap's run record of this run (None when it ran no step)."""
        config = self.config
        if not self.steps:
            return None
        record = run_record(config.model, self.dtype, _gpu_name(config.device), self.wall,
                            self.steps, config.num_layers, config.expert_dtype)
        model = cpu_model()
        if model is not None:
            record["cpu"] = cpu_table_name(model)
        memory = host_memory_bytes()
        # The host memory charged: the job's budget, or the machine's memory if that is less.
        charged = config.host_memory_bytes if memory is None else min(memory,
                                                                     config.host_memory_bytes)
        record["dram_gib"] = round(charged / 2**30, 3)
        record.update({k: v for k, v in self.energy.items() if v is not None})
        return record


def _defaults(config: JobConfig, model: MoEForCausalLM) -> Defaults:
    """The job's defaults with their EOS ids filled in (none with `eos` off)."""
    ids = frozenset() if not config.eos else (config.defaults.eos_token_ids
                                              or frozenset(eos_ids(model)))
    return replace(config.defaults, eos_token_ids=ids)


def _gpu_name(device: str) -> str:
    """The GPU as moe-cap's hardware table names it ("NVIDIA H200" -> "H200"); "none" for a run
    on the CPU alone (docs/moe-cap.md)."""
    if device != "cuda":
        return "none"
    return torch.cuda.get_device_name().removeprefix("NVIDIA ").strip()
