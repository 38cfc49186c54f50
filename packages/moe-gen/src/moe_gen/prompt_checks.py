"""Every request of a job tokenised and checked against the model's context before the model
loads.

A job never dies halfway for an input it could have checked first: a request it cannot run (a
text prompt without a tokenizer, no tokens, a prompt that with its token limit exceeds the
model's context, a chat without a template) stops the job before it starts, with every such
request listed by line. With `truncate`, over-long prompts are cut instead (moe-core's
`fit_prompt`). Checked requests carry their token ids, so the engine does not tokenise again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path

from moe_core import Truncate, bad_lines_message, fit_prompts

from moe_gen.api import Tokenizer, prompt_ids
from moe_gen.errors import InputError
from moe_gen.requests import GenRequest

__all__ = ["checked_requests"]


def checked_requests(requests: Sequence[tuple[int, GenRequest]], tokenizer: Tokenizer | None,
                     context_tokens: int, max_new_tokens: int, truncate: Truncate | None,
                     source: str | Path, vocab_size: int | None = None
                     ) -> list[tuple[int, GenRequest]]:
    """`(index, request)` pairs with each request's prompt as token ids that fit the context.

    Args:
        requests: `(input index, request)` pairs.
        tokenizer: Encodes text prompts and renders chats (None: token-id prompts only).
        context_tokens: The model's context length.
        max_new_tokens: The job's token limit (a request's own wins).
        truncate: Cut over-long prompts on this side instead of refusing them.
        source: The requests file, named in the error.
        vocab_size: Token ids given as such must be below it (None: unchecked).

    Raises:
        InputError: requests that cannot run, listed by line.
    """
    if vocab_size is not None:
        outside = [f"{f'line {r.line}' if r.line else f'request {r.id!r}'}: token id "
                   f"{max(r.token_ids)} is outside the model's vocabulary (0..{vocab_size - 1})"
                   for _, r in requests if r.token_ids and max(r.token_ids) >= vocab_size]
        if outside:
            raise InputError(bad_lines_message(source, outside))
    fitted, problems = fit_prompts(
        ((f"line {r.line}" if r.line else f"request {r.id!r}", partial(prompt_ids, r, tokenizer),
          r.max_new_tokens or max_new_tokens) for _, r in requests), context_tokens, truncate)
    if problems:
        raise InputError(bad_lines_message(source, problems))
    return [(index, replace(request, prompt=None, messages=None, token_ids=tuple(ids)))
            for (index, request), ids in zip(requests, fitted, strict=True)]
