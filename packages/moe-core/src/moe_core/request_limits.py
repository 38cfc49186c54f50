"""Whether a prompt and its token limit fit the model's context, checked before a run.

A prompt longer than the context the model was built for (its `max_position_embeddings`) does
not fail inside the model: the positions run past what the model learnt and it generates junk.
So every tool checks each prompt, after tokenisation and before loading the model, and either
refuses it with a clear error or, when asked, truncates it (`--truncate left` keeps the prompt's
end, `right` its start).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Literal

from moe_core.errors import MoEError, RequestError, SettingError

__all__ = ["TRUNCATE_SIDES", "Truncate", "check_fits_context", "fit_prompt", "fit_prompts",
           "parse_truncate"]

Truncate = Literal["left", "right"]
TRUNCATE_SIDES: tuple[Truncate, ...] = ("left", "right")


def parse_truncate(value: str | None) -> Truncate | None:
    """The `--truncate` option: `left`, `right` or None (refuse over-long prompts).

    Raises:
        SettingError: any other value.
    """
    if value is None:
        return None
    for side in TRUNCATE_SIDES:
        if value == side:
            return side
    raise SettingError(f"--truncate must be left or right, got {value!r}")


def fit_prompt(ids: Sequence[int], max_new_tokens: int, context_tokens: int,
               truncate: Truncate | None = None) -> list[int]:
    """The prompt's tokens, within `context_tokens` together with `max_new_tokens` new ones.

    Args:
        ids: The prompt's token ids.
        max_new_tokens: The most tokens the request may generate.
        context_tokens: The model's context length.
        truncate: `"left"` drops tokens from the prompt's start, `"right"` from its end; None
            refuses a prompt that does not fit.

    Raises:
        RequestError: the prompt is empty, does not fit (without `truncate`), or the token
            limit alone leaves no room for a prompt token.
    """
    if not ids:
        raise RequestError("the prompt is empty: it needs at least one token")
    room = context_tokens - max_new_tokens
    if room < 1:
        raise RequestError(f"max_new_tokens {max_new_tokens} leaves no room for the prompt in "
                           f"the model's context of {context_tokens} tokens")
    if len(ids) <= room:
        return list(ids)
    if truncate is None:
        raise RequestError(f"the prompt is {len(ids)} tokens; with {max_new_tokens} new tokens "
                           f"that exceeds the model's context of {context_tokens} (shorten it, "
                           "lower the token limit, or pass --truncate left|right)")
    return list(ids[-room:]) if truncate == "left" else list(ids[:room])


def check_fits_context(lengths: Sequence[int], max_new_tokens: int, context_tokens: int) -> None:
    """Refuse prompts of these token `lengths` that, with `max_new_tokens`, exceed the context.

    Raises:
        RequestError: an empty prompt, or one that does not fit (the first, by position).
    """
    for index, length in enumerate(lengths):
        try:
            fit_prompt(range(length), max_new_tokens, context_tokens)
        except RequestError as exc:
            raise RequestError(f"prompt {index}: {exc}") from None


def fit_prompts(prompts: Iterable[tuple[str, Callable[[], Sequence[int]], int]],
                context_tokens: int, truncate: Truncate | None = None
                ) -> tuple[list[list[int]], list[str]]:
    """Every prompt of a job fitted at once, so that all that cannot run are reported together.

    Args:
        prompts: `(where, tokens, max_new_tokens)` each: how the user finds it (`"line 3"`), a
            function giving its token ids (tokenising may fail with a `MoEError` too), its limit.
        context_tokens: The model's context length.
        truncate: As `fit_prompt`.

    Returns:
        Each prompt's fitted token ids (empty for one that cannot run), and the problems,
        `"<where>: <why>"`, of those that cannot.
    """
    fitted, problems = [], []
    for where, tokens, max_new_tokens in prompts:
        try:
            fitted.append(fit_prompt(tokens(), max_new_tokens, context_tokens, truncate))
        except MoEError as exc:
            fitted.append([])
            problems.append(f"{where}: {exc}")
    return fitted, problems
