"""`generate`: the Python API. Prompts in, results out in input order."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch
from moe_core import (
    ConfigError,
    MoEForCausalLM,
    RequestError,
    SamplingParams,
    SettingError,
    fit_prompt,
    render_chat,
)

from moe_gen.batch_loop import StepStats, run_loop
from moe_gen.engine import BatchEngine
from moe_gen.expert_usage import ExpertUsage
from moe_gen.host_share_trial import HostShareTrial
from moe_gen.paged_kv import PagedKV
from moe_gen.plan import Plan
from moe_gen.requests import GenRequest
from moe_gen.scheduler import Scheduler
from moe_gen.sequence import GenResult, Sequence

__all__ = ["Defaults", "PromptLike", "Tokenizer", "default_plan", "generate", "prompt_ids",
           "run_requests"]

PromptLike = str | Seq[int] | GenRequest
Tokenizer = object  # a transformers tokenizer (encode, decode, chat template)


@dataclass(frozen=True, kw_only=True)
class Defaults:
    """The job-wide generation settings each request may override.

    Attributes:
        max_new_tokens: Token limit per request.
        temperature: 0 is greedy.
        top_p: Nucleus threshold (None: off).
        top_k: Top-k filter (None: off).
        seed: Base seed; request i samples with `seed + i` unless it names its own.
        eos_token_ids: Tokens that end a sequence (empty: never stop at EOS).
        stop: Stop strings for every request.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int = 0
    eos_token_ids: frozenset[int] = field(default_factory=frozenset)
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise SettingError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                       seed=self.seed)  # validates


def default_plan(num_requests: int, max_tokens: int, *, max_batch_size: int = 64,
                 micro_batch_size: int = 16, page_tokens: int = 16) -> Plan:
    """A plan for a host-memory-unbounded run (tests, small jobs): KV pages for a full batch."""
    batch = max(1, min(max_batch_size, num_requests))
    pages_each = -(-max_tokens // page_tokens)
    return Plan(max_batch_size=batch, micro_batch_size=min(micro_batch_size, batch),
                max_prefill_tokens=max(max_tokens * batch, 1), page_tokens=page_tokens,
                num_kv_pages=pages_each * batch, offload=False)


def prompt_ids(request: GenRequest, tokenizer: Tokenizer | None) -> list[int]:
    """The prompt tokens of `request` (text encoded, chats rendered with the template).

    Raises:
        RequestError: a text prompt without a tokenizer, or one with no tokens.
        ConfigError: a chat, and the tokenizer has no chat template.
    """
    if request.token_ids is not None:
        return list(request.token_ids)
    if tokenizer is None:
        raise RequestError("text prompts need a tokenizer (this model folder has none)")
    if request.messages is not None:
        return render_chat(tokenizer, request.messages)  # type: ignore[arg-type]
    ids = tokenizer.encode(request.prompt, add_special_tokens=True)  # type: ignore[attr-defined]
    if not ids:
        raise RequestError("the prompt has no tokens")
    return list(ids)


def _sequence(index: int, request: GenRequest, defaults: Defaults, tokenizer: Tokenizer | None,
              device: torch.device, context_tokens: int) -> Sequence:
    params = SamplingParams(
        temperature=defaults.temperature if request.temperature is None else request.temperature,
        top_k=defaults.top_k if request.top_k is None else request.top_k,
        top_p=defaults.top_p if request.top_p is None else request.top_p,
        seed=defaults.seed + index if request.seed is None else request.seed)
    generator = None if params.is_greedy else params.generator(device)
    limit = request.max_new_tokens or defaults.max_new_tokens
    try:
        ids = fit_prompt(prompt_ids(request, tokenizer), limit, context_tokens)
    except RequestError as exc:
        raise RequestError(f"request {request.id!r}: {exc}") from None
    return Sequence(request.id, index, ids, limit, params, request.stop + defaults.stop,
                    generator)


def _as_request(index: int, prompt: PromptLike) -> GenRequest:
    if isinstance(prompt, GenRequest):
        return prompt
    if isinstance(prompt, str):
        return GenRequest(str(index), prompt=prompt)
    return GenRequest(str(index), token_ids=tuple(int(t) for t in prompt))


def run_requests(model: MoEForCausalLM, requests: Seq[tuple[int, GenRequest]], plan: Plan,
                 defaults: Defaults, tokenizer: Tokenizer | None,
                 on_result: Callable[[GenResult], None],
                 on_step: Callable[[StepStats], None] = lambda _: None,
                 h2d_bytes: Callable[[], int] = lambda: 0,
                 host_share_trial: bool = True) -> BatchEngine:
    """Run `(input index, request)` pairs through the engine sized by `plan`.

    On a GPU, a plan that gives the host a share of the decode batch has it checked against
    none on the first decode steps, and the faster kept (`HostShareTrial`), unless
    `host_share_trial` is False (the share then stays as planned, e.g. for a benchmark).

    Returns:
        The engine (its KV mover holds the KV copy counters).
    """
    context = model.spec.max_position_embeddings
    sequences = [_sequence(i, r, defaults, tokenizer, model.device, context) for i, r in requests]
    pages = PagedKV(model.spec, plan.num_kv_pages, plan.page_tokens, model.dtype,
                    pin=model.device.type == "cuda")
    engine = BatchEngine(model, pages, plan.micro_batch_size, plan.max_attention_pairs,
                         plan.cpu_attention_share, plan.kv_lookahead,
                         plan.host_attention_kernel, plan.kv_gather)
    scheduler = Scheduler(sequences, pages, plan.max_batch_size, plan.max_prefill_tokens)
    decode = None
    if tokenizer is not None:
        def decode(ids: list[int]) -> str:
            return tokenizer.decode(ids, skip_special_tokens=True)  # type: ignore[attr-defined]

    def moved() -> int:
        return h2d_bytes() + engine.mover.h2d_bytes

    trial = (HostShareTrial(plan.cpu_attention_share)
             if host_share_trial and engine.host_share > 0 and model.device.type == "cuda"
             else None)
    with ExpertUsage(model) as usage:
        run_loop(engine, scheduler, set(defaults.eos_token_ids), decode, on_result, on_step,
                 moved, usage, trial)
    return engine


def generate(model: MoEForCausalLM, prompts: Seq[PromptLike], *, max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float | None = None, top_k: int | None = None,
             seed: int = 0, eos_token_id: int | Seq[int] | None = None,
             stop: Seq[str] = (), tokenizer: Tokenizer | None = None,
             plan: Plan | None = None) -> list[GenResult]:
    """Complete every prompt with module-based batching; results in input order.

    Args:
        model: A loaded model (experts local, or offloaded with the streaming runtime).
        prompts: Text (needs `tokenizer`), token id lists, or `GenRequest`s.
        max_new_tokens: Default token limit per prompt.
        temperature: 0 is greedy.
        top_p: Nucleus threshold.
        top_k: Top-k filter.
        seed: Base sampling seed (prompt i uses `seed + i`).
        eos_token_id: End tokens; default: the checkpoint's generation config, else config.json.
            Pass `[]` to never stop at EOS.
        stop: Stop strings (need `tokenizer`).
        tokenizer: Encodes text prompts and decodes results.
        plan: Batch sizes and KV pages; default: `default_plan` for these prompts.

    Raises:
        SettingError / RequestError: a bad setting, or a request that cannot run (both are
            `ValueError`s).
    """
    requests = [(i, _as_request(i, p)) for i, p in enumerate(prompts)]
    if not requests:
        return []
    defaults = Defaults(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                        top_k=top_k, seed=seed,
                        eos_token_ids=frozenset(eos_ids(model, eos_token_id)), stop=tuple(stop))
    if plan is None:
        longest = max(len(prompt_ids(r, tokenizer)) for _, r in requests)
        limit = max(r.max_new_tokens or max_new_tokens for _, r in requests)
        plan = default_plan(len(requests), longest + limit)
    results: list[GenResult | None] = [None] * len(requests)

    def keep(result: GenResult) -> None:
        results[result.index] = result

    run_requests(model, requests, plan, defaults, tokenizer, keep)
    return [r for r in results if r is not None]


def eos_ids(model: MoEForCausalLM, eos_token_id: int | Seq[int] | None = None) -> set[int]:
    """End tokens: as given, else the checkpoint's generation config, else its config.json."""
    value: object = eos_token_id
    if value is None:
        value = model.generation_defaults.get("eos_token_id")
    if value is None:
        value = model.spec.eos_token_ids
    if isinstance(value, int):
        return {value}
    if not isinstance(value, (list, tuple, set)):
        raise ConfigError(f"the model's eos_token_id is neither an id nor a list of ids: "
                          f"{value!r}")
    return {int(v) for v in value}
