"""From a validated OpenAI body to the engine's `GenerationRequest`: the prompt's tokens (chat
messages through the model's chat template), the token limit, sampling and stop strings, and
every check that needs the tokenizer or the model (token ids in the vocabulary, the prompt and
its limit within the context). Each refusal is an `ApiError` 400 naming the field.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from moe_core import MoEError, SamplingParams, render_chat

from moe_infinity.serving.api_errors import ApiError
from moe_infinity.serving.openai_schema import ChatCompletionBody, CompletionBody
from moe_infinity.serving.request import GenerationRequest

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["RequestLimits", "chat_request", "completion_request"]

_OPENAI_TEMPERATURE = 1.0  # OpenAI's default when a request names none
# Below this a temperature is greedy: dividing logits by 5e-324 overflows to inf and NaN.
_GREEDY_BELOW = 1e-5


class RequestLimits:
    """What the served model allows.

    Attributes:
        vocab_size: Token ids must be below this.
        max_request_tokens: Prompt plus token limit, at most.
        context_tokens: The model's context length.
    """

    def __init__(self, vocab_size: int, max_request_tokens: int, context_tokens: int) -> None:
        self.vocab_size = vocab_size
        self.max_request_tokens = max_request_tokens
        self.context_tokens = context_tokens


def completion_request(body: CompletionBody, request_id: str,
                       tokenizer: PreTrainedTokenizerBase, limits: RequestLimits
                       ) -> GenerationRequest:
    """The engine request of a `/v1/completions` body."""
    _check_common(body.n, body.best_of)
    if body.echo:
        raise ApiError(400, "echo is not supported", param="echo", code="unsupported")
    if body.suffix:
        raise ApiError(400, "suffix is not supported", param="suffix", code="unsupported")
    ids = _prompt_ids(body.prompt, tokenizer, limits)
    max_tokens = body.max_tokens if body.max_tokens is not None else 16
    return _request(body, request_id, ids, max_tokens, "max_tokens", limits, body.logprobs)


def chat_request(body: ChatCompletionBody, request_id: str,
                 tokenizer: PreTrainedTokenizerBase, limits: RequestLimits) -> GenerationRequest:
    """The engine request of a `/v1/chat/completions` body."""
    _check_common(body.n, None)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in body.messages]
    try:
        ids = render_chat(tokenizer, messages)
    except MoEError as exc:
        raise ApiError(400, str(exc), param="messages") from None
    except Exception as exc:  # the template's own refusal (jinja: roles must alternate, ...)
        raise ApiError(400, f"the chat template refused the messages: {exc}",
                       param="messages") from None
    if not ids:
        raise ApiError(400, "the messages render to no tokens", param="messages")
    limit, field = body.max_completion_tokens, "max_completion_tokens"
    if limit is None:
        limit, field = body.max_tokens, "max_tokens"
    if limit is None:  # OpenAI's default: as many as the context leaves
        limit = max(1, min(limits.max_request_tokens, limits.context_tokens) - len(ids))
    top = None
    if body.logprobs:
        top = body.top_logprobs or 0
    elif body.top_logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    return _request(body, request_id, ids, limit, field, limits, top)


def _check_common(n: int | None, best_of: int | None) -> None:
    if n not in (None, 1):
        raise ApiError(400, f"n must be 1 (one choice per request), got {n}", param="n",
                       code="unsupported")
    if best_of not in (None, 1):
        raise ApiError(400, f"best_of must be 1, got {best_of}", param="best_of",
                       code="unsupported")


def _prompt_ids(prompt: str | list[str] | list[int] | list[list[int]],
                tokenizer: PreTrainedTokenizerBase, limits: RequestLimits) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = [int(i) for i in tokenizer(prompt)["input_ids"]]
    elif all(isinstance(i, int) for i in prompt):
        ids = [int(i) for i in prompt]  # type: ignore[arg-type]
        bad = [i for i in ids if i >= limits.vocab_size]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is outside the vocabulary "
                           f"({limits.vocab_size} tokens)", param="prompt")
    else:
        raise ApiError(400, "one prompt per request (send several requests to batch)",
                       param="prompt", code="unsupported")
    if not ids:
        raise ApiError(400, "the prompt is empty: it needs at least one token", param="prompt")
    return ids


def _request(body: CompletionBody | ChatCompletionBody, request_id: str, ids: list[int],
             max_tokens: int, field: str, limits: RequestLimits,
             logprobs: int | None) -> GenerationRequest:
    need = len(ids) + max_tokens
    if need > limits.max_request_tokens:
        raise ApiError(400, f"the prompt ({len(ids)} tokens) plus {field} ({max_tokens}) is "
                       f"{need} tokens; at most {limits.max_request_tokens} fit (model context "
                       f"{limits.context_tokens})", param=field, code="context_length_exceeded")
    top_k = body.top_k if body.top_k is not None and body.top_k > 0 else None
    temperature = body.temperature if body.temperature is not None else _OPENAI_TEMPERATURE
    if temperature < _GREEDY_BELOW:
        temperature = 0.0
    sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=body.top_p,
                              seed=body.seed)
    return GenerationRequest(request_id=request_id, prompt_ids=tuple(ids), max_tokens=max_tokens,
                             sampling=sampling, stop=body.stop_strings(), logprobs=logprobs,
                             ignore_eos=body.ignore_eos)
