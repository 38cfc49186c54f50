"""A streaming engine on moe-core's model: prefill, then one decode step per token at batch 1
(moe-core's `DecodeRunner`: steps replayed from CUDA graphs where the model allows it, as
`moe-core generate` decodes), with the routed experts offloaded to host memory
(`load_offloaded`) when a slot budget is given.

This is what `--engine moe-infinity` drives until moe-infinity's in-process serving engine
lands; swapping it in is `engines.moe_infinity_engine`. Each forward step is recorded (phase,
`[past, new]` chunk, time, host-to-device bytes), so the run record carries utilisation.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from functools import partial
from typing import Any, Literal

import torch
from moe_core import (
    DecodeRunner,
    MoEForCausalLM,
    OffloadRuntime,
    SamplingParams,
    fit_prompt,
    load_model,
    load_offloaded,
    load_tokenizer,
    render_chat,
    resolve_model_path,
    routing_for,
    sample_next,
)

from moe_cap.engine_options import EngineOptions, precision_name
from moe_cap.errors import TargetError, WorkloadError
from moe_cap.run_record import StepRecord
from moe_cap.step_cost import Chunk
from moe_cap.streaming_engine import EngineInfo
from moe_cap.target import Completion, GenerationSettings
from moe_cap.workload import WorkItem

__all__ = ["CoreStreamingEngine", "gpu_name"]


def gpu_name(device: str) -> str:
    """The GPU as the hardware table names it ("NVIDIA H200" -> "H200"); `none` on the CPU."""
    if device != "cuda":
        return "none"
    return torch.cuda.get_device_name().removeprefix("NVIDIA ").strip()


class CoreStreamingEngine:
    """moe-core's model generating one request at a time, token by token."""

    def __init__(self, model: MoEForCausalLM, tokenizer: Any, info: EngineInfo,
                 runtime: OffloadRuntime | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.runtime = runtime
        self._info = info
        self._steps: list[StepRecord] = []
        self._routing = ExitStack()  # benchmark routing, entered by `load`
        eos: Any = model.generation_defaults.get("eos_token_id") or model.spec.eos_token_ids
        self._eos: set[int] = {eos} if isinstance(eos, int) else {int(e) for e in eos or ()}

    @classmethod
    def load(cls, options: EngineOptions, label: str) -> CoreStreamingEngine:
        """Load the model of `options` (offloaded when `expert_memory_bytes` is set, its experts
        as FP8 with `expert_dtype`)."""
        folder = resolve_model_path(options.model, weights=False)
        runtime = None
        if options.expert_memory_bytes is not None:
            loaded = load_offloaded(options.model, options.device, options.expert_memory_bytes,
                                    dtype=options.dtype, dummy=options.dummy,
                                    num_layers=options.num_layers,
                                    fetch="mapped" if options.fetch == "mapped" else "copy",
                                    two_lanes=options.lanes == 2,
                                    prefill="stream" if options.prefill == "stream" else "admit",
                                    expert_dtype=options.expert_dtype)
            model, runtime = loaded.model, loaded.runtime
        else:
            model = load_model(options.model, options.device, options.dtype,
                               dummy=options.dummy, num_layers=options.num_layers)
        info = EngineInfo(label, options.model, precision_name(model.dtype), options.num_layers,
                          gpu_name(options.device), options.expert_dtype)
        tokenizer = load_tokenizer(folder, model.spec.vocab_size if options.dummy else None)
        engine = cls(model, tokenizer, info, runtime)
        if options.routing is not None:
            # Set for the engine's life: the override is an attribute of each MoE block, read
            # by whichever thread runs the model.
            engine._routing.enter_context(routing_for(model, options.routing))
        return engine

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Tokens that end a generation (unless a request ignores EOS)."""
        return frozenset(self._eos)

    @property
    def info(self) -> EngineInfo:
        """The model and engine, for the record."""
        return self._info

    def prompt_ids(self, item: WorkItem) -> list[int]:
        """The prompt's tokens (a chat rendered with the model's template)."""
        if item.messages is not None:
            return render_chat(self.tokenizer, item.messages)
        return list(self.tokenizer.encode(item.prompt, add_special_tokens=True))

    def check(self, items: Sequence[WorkItem], settings: GenerationSettings) -> None:
        """Refuse a workload with a request that cannot run (an empty prompt, or one that with
        its limit exceeds the model's context), listing every such request, before any runs.

        Raises:
            WorkloadError: naming the requests at fault.
        """
        context = self.model.spec.max_position_embeddings
        problems = []
        for item in items:
            limit = item.max_tokens or settings.max_tokens
            try:
                ids = self.prompt_ids(item)
                if not ids:
                    raise WorkloadError("the prompt has no tokens")
                fit_prompt(ids, limit, context)
            except ValueError as exc:
                problems.append(f"request {item.id!r}: {exc}")
        if problems:
            shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more"
                                               if len(problems) > 5 else "")
            raise WorkloadError(f"{len(problems)} request(s) cannot run on {self._info.model}: "
                                f"{shown}")

    def _copied(self) -> int:
        return 0 if self.runtime is None else int(self.runtime.stats.bytes_copied)

    def _step(self, phase: Literal["prefill", "decode"], run: Callable[[], torch.Tensor],
              past: int, tokens: int,
              params: SamplingParams, generator: torch.Generator | None) -> int:
        """One forward step (`run` gives its logits `[1, V]`) and the sampled token, recorded."""
        started, copied = time.perf_counter(), self._copied()
        token = int(sample_next(run(), params, generator)[0])  # waits for the device
        self._steps.append(StepRecord(phase, max(time.perf_counter() - started, 1e-9),
                                      (Chunk(past, tokens),), self._copied() - copied))
        return token

    @torch.no_grad()
    def generate(self, item: WorkItem, settings: GenerationSettings,
                 on_token: Callable[[], None], cancelled: threading.Event) -> Completion:
        """Prefill, then decode until EOS (unless `item.ignore_eos`), the limit or `cancelled`.

        Raises:
            TargetError: the prompt and its limit do not fit the model's context.
        """
        limit = item.max_tokens or settings.max_tokens
        try:
            ids = fit_prompt(self.prompt_ids(item), limit, self.model.spec.max_position_embeddings)
        except ValueError as exc:
            raise TargetError(str(exc)) from None
        params = SamplingParams(temperature=settings.temperature, seed=settings.seed)
        generator = params.generator(self.model.device)
        device = self.model.device
        # moe-core's decode runner: steps replayed from CUDA graphs where the model allows it
        # (eager on the CPU), its static cache and graphs kept for the next request
        runner = self.model.decode_runner(1, len(ids) + limit)
        prompt = torch.tensor([ids], device=device)
        token = self._step("prefill", lambda: runner.prefill(prompt, torch.ones_like(prompt)),
                           0, len(ids), params, generator)
        generated, reason = [token], "length"
        on_token()
        active = torch.ones(1, dtype=torch.bool, device=device)
        while len(generated) < limit and not cancelled.is_set():
            if token in self._eos and not item.ignore_eos:
                reason = "stop"
                break
            token = self._step("decode", partial(_decode, runner, token, active),
                               len(ids) + len(generated) - 1, 1, params, generator)
            generated.append(token)
            on_token()
        else:
            if token in self._eos and not item.ignore_eos:
                reason = "stop"
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        return Completion(text=text, prompt_tokens=len(ids), output_tokens=len(generated),
                          finish_reason=reason)

    def steps(self) -> list[StepRecord]:
        """Every forward step run so far."""
        return list(self._steps)

    def counters(self) -> dict[str, float]:
        """The offload runtime's expert hits, misses and bytes (empty without offloading)."""
        if self.runtime is None:
            return {}
        stats = self.runtime.stats
        return {"expert_hits": float(stats.hits), "expert_misses": float(stats.misses),
                "h2d_bytes": float(stats.bytes_copied), "evictions": float(stats.evictions)}


def _decode(runner: DecodeRunner, token: int, active: torch.Tensor) -> torch.Tensor:
    """Logits `[1, V]` of one decode step of `runner` after `token`."""
    return runner.step(torch.tensor([token], device=active.device), active)[0]
