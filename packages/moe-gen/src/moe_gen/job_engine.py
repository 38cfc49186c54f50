"""One engine of a job: a loaded model made ready once (experts packed and streamed per the
plan), request sets run through it, and what it measured. A job in this process has one; a job
on Ray has one in each engine actor. The job's benchmark routing is set around each run, so
every engine routes its own model copy."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path

import torch
from moe_core import ConfigError, ModelSpec, MoEForCausalLM, load_tokenizer, routing_for

from moe_gen.api import Defaults, eos_ids, run_requests
from moe_gen.batch_loop import StepStats
from moe_gen.energy_meter import EnergyMeter
from moe_gen.job_config import JobConfig
from moe_gen.model_setup import install_streaming
from moe_gen.plan import Plan
from moe_gen.planner import Budget, make_plan
from moe_gen.profile import DeviceProfile, profile_device
from moe_gen.requests import GenRequest
from moe_gen.sequence import GenResult

__all__ = ["JobEngine", "benchmark_routing", "job_shape", "job_tokenizer", "plan_job"]


def job_tokenizer(folder: Path, stand_in_vocab: int | None = None) -> object | None:
    """The model folder's tokenizer, or None (shapes and tiny test checkpoints have none: they
    run token-id prompts only). With `stand_in_vocab` (a dummy run), a folder without one gets
    a word-level stand-in of that vocabulary, so text prompts (a benchmark's synthetic ones) run
    too."""
    try:
        return load_tokenizer(folder, stand_in_vocab)
    except ConfigError:
        return None


def job_shape(todo: Sequence[tuple[int, GenRequest]], max_new_tokens: int) -> tuple[int, int]:
    """The longest prompt and the largest token limit of checked requests (token-id prompts),
    which the planner sizes the run for."""
    longest = max(len(r.token_ids or ()) for _, r in todo)
    return longest, max(r.max_new_tokens or max_new_tokens for _, r in todo)


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


class JobEngine:
    """A model ready to run request sets by `plan`, and its measurements summed over them.

    Attributes:
        plan: The plan it runs.
        defaults: The job's defaults, EOS ids filled in from the model.
        wall_s: Wall time of its runs.
        energy_j: Energy measured over its runs (`gpu_energy_j`, `cpu_energy_j`; a key is None
            where a run could not measure it).
        offload: Its offload runtime's counters (empty: nothing streamed).
    """

    def __init__(self, config: JobConfig, model: MoEForCausalLM, plan: Plan, *,
                 measure_energy: bool = True) -> None:
        """Pack and stream the experts of `model` (loaded on the host) per `plan`.

        Args:
            config: The job.
            model: The model, loaded on the host.
            plan: How to run it.
            measure_energy: Read the GPU's and the CPU packages' energy counters (off where
                they would count other engines' energy too: engines that share a host).
        """
        self.plan = plan
        self.defaults = _defaults(config, model)
        self._device = config.device
        self._routing = config.routing
        self._loaded = install_streaming(model, plan, config.device,
                                         fp8_experts=config.expert_dtype == "fp8")
        self.wall_s = 0.0
        start = 0.0 if measure_energy else None
        self.energy_j: dict[str, float | None] = {"gpu_energy_j": start, "cpu_energy_j": start}
        self.offload: dict[str, int | float] = {}

    def run(self, todo: Sequence[tuple[int, GenRequest]], tokenizer: object | None,
            on_result: Callable[[GenResult], None],
            on_step: Callable[[StepStats], None]) -> None:
        """Run `(input index, checked request)` pairs to their ends, results as they finish."""
        runtime = self._loaded.runtime
        started = time.perf_counter()
        meter = EnergyMeter(0 if self._device == "cuda" else None)
        measuring = any(v is not None for v in self.energy_j.values())
        model = self._loaded.model
        try:
            with (meter if measuring else nullcontext(),
                  benchmark_routing(model, self._routing, self.defaults.seed)):
                run_requests(model, todo, self.plan, self.defaults, tokenizer,
                             on_result, on_step,
                             (lambda: runtime.stats.bytes_copied) if runtime else (lambda: 0))
        finally:
            self.wall_s += time.perf_counter() - started
            for key, value in (("gpu_energy_j", meter.gpu_j), ("cpu_energy_j", meter.cpu_j)):
                total = self.energy_j[key]
                self.energy_j[key] = None if total is None or value is None else total + value
            self.offload = runtime.summary() if runtime is not None else {}


@contextmanager
def benchmark_routing(model: MoEForCausalLM, spec: str | None, seed: int) -> Iterator[None]:
    """`model` routed by `spec` while inside (`moe_core.routing_for`; None: its own routers).

    The draws of `uniform` and `zipf` come from torch's default generators: they are seeded
    with `seed` on entry (zipf's per-layer popularity order too), so a run is repeatable, and
    the caller's generator states are put back on exit.
    """
    if spec is None:
        yield
        return
    device = model.device
    cuda = None if device.type != "cuda" else (
        device.index if device.index is not None else torch.cuda.current_device())
    # Only the model's GPU: forking every GPU's state would start a context on each.
    with torch.random.fork_rng(devices=[] if cuda is None else [cuda]), \
            routing_for(model, spec, seed=seed):
        torch.default_generator.manual_seed(seed)
        if cuda is not None:
            with torch.cuda.device(cuda):
                torch.cuda.manual_seed(seed)
        yield


def _defaults(config: JobConfig, model: MoEForCausalLM) -> Defaults:
    """The job's defaults with their EOS ids filled in (none with `eos` off)."""
    ids = frozenset() if not config.eos else (config.defaults.eos_token_ids
                                              or frozenset(eos_ids(model)))
    return replace(config.defaults, eos_token_ids=ids)
