"""Run prompts through a model one at a time and record their traces."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Protocol

from moe_core import (
    MoEForCausalLM,
    RequestError,
    SettingError,
    Truncate,
    bad_lines_message,
    fit_prompts,
    render_chat,
)

from moe_infinity.errors import MoEInfinityError
from moe_infinity.model_shape import ModelShape
from moe_infinity.prompts import Prompt
from moe_infinity.trace import TraceSet
from moe_infinity.tracer import ActivationTracer, LookaheadInput

__all__ = ["TraceConfig", "checked_prompts", "trace_prompts"]


class _Tokenizer(Protocol):
    def __call__(self, text: str) -> dict[str, list[int]]: ...


@dataclass(frozen=True, kw_only=True)
class TraceConfig:
    """How prompts are run while tracing.

    Attributes:
        max_new_tokens: Tokens generated per prompt (a prompt's own limit wins).
        temperature: 0 is greedy.
        seed: Sampling seed (each request gets `seed + index`).
        lookahead_input: See `ActivationTracer`.
        lookahead_top: Experts kept per step and layer in the lookahead (default 4 x top-k).
        expert_dtype: The format experts would cross PCIe in (sets bytes per expert).
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    seed: int = 0
    lookahead_input: LookaheadInput = "next_norm"
    lookahead_top: int | None = None
    expert_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise SettingError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise SettingError(f"temperature must be >= 0, got {self.temperature}")
        if self.lookahead_input not in ("next_norm", "block_input"):
            raise SettingError(f"lookahead_input must be 'next_norm' or 'block_input', "
                             f"got {self.lookahead_input!r}")
        if self.lookahead_top is not None and self.lookahead_top <= 0:
            raise SettingError(f"lookahead_top must be positive, got "
                             f"{self.lookahead_top}")


def _token_ids(tokenizer: _Tokenizer, prompt: Prompt) -> list[int]:
    if prompt.token_ids is not None:
        return list(prompt.token_ids)
    if prompt.messages is not None:
        return render_chat(tokenizer, [{"role": r, "content": c}  # type: ignore[arg-type]
                                       for r, c in prompt.messages])
    assert prompt.text is not None
    return list(tokenizer(prompt.text)["input_ids"])


def checked_prompts(prompts: Sequence[Prompt], tokenizer: _Tokenizer, context_tokens: int,
                    config: TraceConfig, truncate: Truncate | None = None,
                    source: str | Path = "prompts") -> list[Prompt]:
    """`prompts` with their tokens, each checked to fit the model's context with its token limit
    (cut on the `truncate` side if given), before any model is loaded.

    Raises:
        MoEInfinityError: prompts that cannot run (no tokens, too long), listed by line.
    """
    fitted, problems = fit_prompts(
        ((f"line {p.line}" if p.line else f"prompt {p.request_id!r}",
          partial(_token_ids, tokenizer, p),
          config.max_new_tokens if p.max_new_tokens is None else p.max_new_tokens)
         for p in prompts), context_tokens, truncate)
    if problems:
        raise MoEInfinityError(bad_lines_message(source, problems))
    return [replace(p, token_ids=tuple(ids)) for p, ids in zip(prompts, fitted, strict=True)]


def trace_prompts(model: MoEForCausalLM, tokenizer: _Tokenizer, prompts: Sequence[Prompt],
                  model_name: str, config: TraceConfig = TraceConfig(),
                  on_request: Callable[[int], None] | None = None) -> TraceSet:
    """Generate for each prompt in order (batch 1) and record its trace.

    Args:
        model: The model (any device).
        tokenizer: Its tokenizer (`tokenizer(text)["input_ids"]`, and a chat template for chat
            prompts).
        prompts: The requests, run in this order.
        model_name: Stored in the trace header.
        config: Generation and tracing settings.
        on_request: Called with the number of requests done after each one (progress).
    """
    shape = ModelShape.from_spec(model_name, model.spec, config.expert_dtype)
    traces = []
    with ActivationTracer(model, config.lookahead_top, config.lookahead_input) as tracer:
        for index, prompt in enumerate(prompts):
            ids = _token_ids(tokenizer, prompt)
            if not ids:
                raise RequestError(f"prompt {prompt.request_id!r} has no tokens")
            limit = prompt.max_new_tokens if prompt.max_new_tokens is not None \
                else config.max_new_tokens
            tracer.begin_request()
            model.generate([ids], max_new_tokens=limit, temperature=config.temperature,
                           seed=config.seed + index)
            traces.append(tracer.end_request(prompt.request_id, prompt.domain))
            if on_request is not None:
                on_request(index + 1)
    settings = {**asdict(config), "lookahead_top": tracer.lookahead_top}
    return TraceSet(shape, traces, settings)
