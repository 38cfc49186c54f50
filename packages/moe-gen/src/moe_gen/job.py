"""A generation job: read requests, skip those already done, plan, load, run, write each result as
it finishes, and sum up what happened (the summary, the report and moe-cap's run record)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

import torch
from moe_core import ConfigError, ModelSpec, MoEForCausalLM, load_tokenizer, run_dtype

from moe_gen.api import Defaults, eos_ids, prompt_ids, run_requests
from moe_gen.batch_loop import StepStats
from moe_gen.model_setup import install_streaming, load_for_generation
from moe_gen.output_file import ResultWriter, finished_ids
from moe_gen.plan import Plan
from moe_gen.planner import Budget, make_plan
from moe_gen.profile import DeviceProfile, profile_device
from moe_gen.requests import read_requests
from moe_gen.run_record import run_record
from moe_gen.sequence import GenResult
from moe_gen.summary import JobSummary, summarise

__all__ = ["JobConfig", "run_job", "sample_input"]


def sample_input() -> Path:
    """The embedded sample prompts (the default `--input`)."""
    return Path(str(resources.files("moe_gen") / "data" / "sample_prompts.jsonl"))


@dataclass(frozen=True)
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

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"JobConfig.device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.gpu_memory_bytes <= 0 or self.host_memory_bytes <= 0:
            raise ValueError("JobConfig: memory budgets must be positive")
        if not 0.0 <= self.max_cpu_attention_share <= 1.0:
            raise ValueError(f"--max-cpu-attention-share must be in [0, 1], got "
                             f"{self.max_cpu_attention_share}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA GPU is available")

    def run_dtype(self, spec: ModelSpec) -> torch.dtype:
        """The dtype the job runs `spec` in: `dtype`, else moe-core's rule for `device`."""
        return run_dtype(self.dtype, self.device, spec.torch_dtype)


@dataclass
class JobOutcome:
    """What a job did.

    Attributes:
        summary: Throughput and counters.
        plan: The plan it ran.
        profile: The device profile the planner used (None with a fixed plan).
        dtype: The dtype the model ran in.
        record: moe-cap's run record (None when nothing ran).
        skipped: Requests already in the output.
    """

    summary: JobSummary
    plan: Plan
    profile: DeviceProfile | None
    dtype: torch.dtype
    record: dict[str, object] | None
    skipped: int


def _tokenizer(model_source: Path | None) -> object | None:
    if model_source is None:
        return None
    try:
        return load_tokenizer(model_source)
    except ConfigError:
        return None  # shapes and tiny test checkpoints have no tokenizer: token-id prompts only


def plan_job(config: JobConfig, spec: ModelSpec, prompt_tokens: int, max_new: int,
             num_requests: int) -> tuple[Plan, DeviceProfile]:
    """Profile the device and let the planner size the run."""
    dtype = config.run_dtype(spec)
    profile = profile_device(spec, config.device, dtype)
    reserve = 3 << 29 if config.device == "cuda" else 0  # 1.5 GiB: allocator slack, kernels
    budget = Budget(config.gpu_memory_bytes, config.host_memory_bytes, prompt_tokens, max_new,
                    num_requests, reserve, config.max_cpu_attention_share)
    return make_plan(spec, dtype, profile, budget), profile


def run_job(config: JobConfig, on_start: Callable[[int, int], None] = lambda total, done: None,
            on_result: Callable[[GenResult], None] = lambda _: None,
            on_step: Callable[[StepStats], None] = lambda _: None) -> JobOutcome:
    """Run the job to the end (rerun it to resume after an interruption).

    Raises:
        InputError / ValueError / MoECoreError: user mistakes (bad input, model, budget).
    """
    requests = read_requests(config.input)
    done = finished_ids(config.output)
    todo = [(i, r) for i, r in enumerate(requests) if r.id not in done]
    on_start(len(requests), len(requests) - len(todo))
    dtype = config.run_dtype(ModelSpec.from_pretrained(config.model))
    model = load_for_generation(config.model, config.device, dtype,
                                dummy=config.dummy, num_layers=config.num_layers)
    tokenizer = _tokenizer(model.source)
    defaults = _defaults(config, model)
    lengths = [len(prompt_ids(r, tokenizer)) for _, r in todo] or [1]
    max_new = max([r.max_new_tokens or defaults.max_new_tokens for _, r in todo] or [1])
    profile = None
    plan = config.plan
    if plan is None:
        plan, profile = plan_job(config, model.spec, max(lengths), max_new, max(len(todo), 1))
    loaded = install_streaming(model, plan, config.device)
    steps: list[StepStats] = []
    writer = ResultWriter(config.output)
    started = time.perf_counter()

    def finished(result: GenResult) -> None:
        writer.write(result)
        on_result(result)

    def stepped(stats: StepStats) -> None:
        steps.append(stats)
        on_step(stats)

    runtime = loaded.runtime
    try:
        if todo:
            run_requests(loaded.model, todo, plan, defaults, tokenizer, finished, stepped,
                         (lambda: runtime.stats.bytes_copied) if runtime else (lambda: 0))
    finally:
        writer.close()
    wall = time.perf_counter() - started
    offload = runtime.summary() if runtime is not None else {}
    summary = summarise(len(todo), steps, wall, offload, plan)
    record = (run_record(config.model, dtype, _gpu_name(config.device), wall, steps,
                         config.num_layers) if steps else None)
    return JobOutcome(summary, plan, profile, dtype, record, len(requests) - len(todo))


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
