"""Log-likelihood tasks as a run: perplexity of a text file or multiple choice, scored in
process by moe-core's forward pass on the engine's model, or by a server's prompt log-probs;
the result is a run record whose `accuracy` holds the score (and, in process, one prefill step
per forward pass)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from moe_core import check_output_path, load_model, load_tokenizer, resolve_model_path

from moe_cap.accuracy_result import AccuracyResult
from moe_cap.core_engine import CoreStreamingEngine, gpu_name
from moe_cap.engine_options import EngineOptions, precision_name
from moe_cap.engines import import_engine_package, moe_infinity_engine
from moe_cap.errors import TargetError
from moe_cap.interruptible import run_interruptible
from moe_cap.model_scorer import ModelScorer
from moe_cap.multiple_choice import read_choice_questions, score_choices
from moe_cap.openai_target import OpenAITarget
from moe_cap.perplexity import perplexity_in_process, perplexity_via_server, read_text
from moe_cap.run_benchmark import ServerSpec
from moe_cap.run_record import RunRecord, StepRecord

__all__ = ["ScoringConfig", "in_process_scorer", "run_scoring"]

ScoringTask = Literal["perplexity", "choice"]


@dataclass(frozen=True, kw_only=True)
class ScoringConfig:
    """A log-likelihood task.

    Attributes:
        task: `"perplexity"` (a text file) or `"choice"` (a multiple-choice JSONL).
        data: The data file.
        record_path: The run record to write.
        seq_len: Perplexity: scored tokens per window (words, through a server).
        weight_dtype: What a server runs (engines report their own).
        gpu, cpu, dram_gib: Hardware for the cost model (default GPU: this machine's).
    """

    task: ScoringTask
    data: Path
    record_path: Path
    seq_len: int = 256
    weight_dtype: str = "bf16"
    gpu: str | None = None
    cpu: str | None = None
    dram_gib: float | None = None


def in_process_scorer(options: EngineOptions) -> tuple[ModelScorer, str]:
    """The engine's model as a scorer, and the engine's label. moe-gen has no log-prob API of
    its own: its model is loaded with moe-core and scored by the same forward pass."""
    if options.engine == "moe-infinity":
        engine = moe_infinity_engine(options)
        assert isinstance(engine, CoreStreamingEngine)
        return ModelScorer(engine.model, engine.tokenizer), engine.info.label
    package = import_engine_package("moe-gen")
    model = load_model(options.model, options.device, options.dtype, dummy=options.dummy,
                       num_layers=options.num_layers)
    tokenizer = load_tokenizer(resolve_model_path(options.model, weights=False))
    return ModelScorer(model, tokenizer), f"moe-gen {package.__version__} (moe-core forward)"


def _continuation(scorer: ModelScorer, context: str, continuation: str) -> tuple[list[int],
                                                                                 list[int]]:
    """Context and continuation tokens, split where the context's own tokens end (so a
    continuation that merges with the context's last token is still scored whole)."""
    ctx, whole = scorer.encode(context), scorer.encode(context + continuation)
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx):]
    return ctx, scorer.encode(continuation)


def _score_in_process(scorer: ModelScorer, config: ScoringConfig) -> AccuracyResult:
    if config.task == "perplexity":
        return perplexity_in_process(scorer, read_text(config.data), config.seq_len,
                                     str(config.data))

    def loglikelihood(context: str, continuation: str) -> float:
        return scorer.loglikelihood(*_continuation(scorer, context, continuation))[0]

    return score_choices(read_choice_questions(config.data), loglikelihood, str(config.data))


def _score_server(target: OpenAITarget, config: ScoringConfig) -> AccuracyResult:
    if config.task == "perplexity":
        return perplexity_via_server(target, read_text(config.data), config.seq_len,
                                     str(config.data))
    questions = read_choice_questions(config.data)

    async def total(text: str) -> float:
        return sum(v for v in await target.prompt_logprobs(text) if v is not None)

    def loglikelihood(context: str, continuation: str) -> float:
        async def both() -> float:
            return await total(context + continuation) - await total(context)
        return run_interruptible(both())

    try:
        return score_choices(questions, loglikelihood, str(config.data))
    finally:
        run_interruptible(target.aclose())


def run_scoring(target: ServerSpec | EngineOptions, config: ScoringConfig) -> RunRecord:
    """Score the task through `target` and write its run record.

    Raises:
        WorkloadError: a bad data file. TargetError: a server without prompt log-probs, an
            engine that is not installed.
    """
    check_output_path(config.record_path, "the run record")
    if config.task == "perplexity":
        read_text(config.data)  # fail on the input before loading anything
    else:
        read_choice_questions(config.data)
    started = time.perf_counter()
    if isinstance(target, ServerSpec):
        server = OpenAITarget(target.url, target.model, target.api_key)
        run_interruptible(server.check())
        steps: tuple[StepRecord, ...] = ()
        accuracy, label = _score_server(server, config), target.label or server.label
        model, dtype, gpu = target.model, config.weight_dtype, config.gpu or "none"
    else:
        scorer, label = in_process_scorer(target)
        started = time.perf_counter()
        accuracy = _score_in_process(scorer, config)
        steps, model = tuple(scorer.steps), target.model
        dtype, gpu = precision_name(scorer.model.dtype), config.gpu or gpu_name(target.device)
    wall = max(time.perf_counter() - started, sum(s.seconds for s in steps), 1e-9)
    tokens = sum(c.new_tokens for s in steps for c in s.chunks) or accuracy.num_examples
    if tokens <= 0:
        raise TargetError("nothing was scored")
    record = RunRecord(engine=label, model=model, weight_dtype=dtype, kv_dtype=dtype, gpu=gpu,
                       wall_seconds=wall, input_tokens=tokens, output_tokens=0, steps=steps,
                       num_layers=getattr(target, "num_layers", None), cpu=config.cpu,
                       dram_gib=config.dram_gib, energy_source="tdp", accuracy=accuracy)
    record.to_json(config.record_path)
    return record
