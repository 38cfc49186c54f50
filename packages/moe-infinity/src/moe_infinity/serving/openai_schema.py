"""The OpenAI request bodies the server accepts, validated strictly.

Strict types (a string is not a number, a number is not a boolean), ranges as OpenAI documents
them, unknown fields ignored (clients send `user`, `frequency_penalty`, ...). Anything these
models refuse becomes a 400 with an OpenAI-shaped error naming the field (`api_errors.py`).
Extensions, as vLLM names them: `top_k` and `ignore_eos`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

__all__ = ["ChatCompletionBody", "ChatMessage", "CompletionBody", "StreamOptions", "TextPart"]

_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1  # what a torch generator accepts
_MAX_TOKENS = 2**31 - 1
_MAX_STOPS = 16


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    """`stream_options`."""

    include_usage: StrictBool = False


class _Sampling(_Body):
    """Fields shared by completions and chat completions."""

    model: StrictStr
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[StrictInt, Field(ge=-1, le=_MAX_TOKENS)] | None = None
    seed: Annotated[StrictInt, Field(ge=_SEED_MIN, le=_SEED_MAX)] | None = None
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=_MAX_STOPS)] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=128)] | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: StrictBool = False

    def stop_strings(self) -> tuple[str, ...]:
        """`stop` as a tuple (empty strings dropped)."""
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return tuple(s for s in stops if s)


class CompletionBody(_Sampling):
    """`POST /v1/completions`."""

    prompt: StrictStr | Annotated[list[StrictStr], Field(min_length=1)] | \
        Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)] | \
        Annotated[list[Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)]],
                  Field(min_length=1)]
    max_tokens: Annotated[StrictInt, Field(ge=1, le=_MAX_TOKENS)] | None = 16
    logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    echo: StrictBool | None = False
    best_of: Annotated[StrictInt, Field(ge=1)] | None = None
    suffix: StrictStr | None = None


class TextPart(_Body):
    """One part of a message's content: only text is understood."""

    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Body):
    """One message of a conversation."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None

    def text(self) -> str:
        """The message's text (its text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionBody(_Sampling):
    """`POST /v1/chat/completions`."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[StrictInt, Field(ge=1, le=_MAX_TOKENS)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1, le=_MAX_TOKENS)] | None = None
    logprobs: StrictBool | None = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
