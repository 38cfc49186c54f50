"""OpenAI response objects built from the engine's events: whole responses and stream chunks
of `/v1/completions` and `/v1/chat/completions`, usage and log-probabilities.

Every function returns a JSON-ready dict; the routes serialise it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from moe_infinity.serving.request import FinishReason, SequenceEvent, TokenLogprob

__all__ = ["ResponseMaker", "usage"]

TokenText = Callable[[int], str]
"""A token's text (for log-probabilities)."""

JSON = dict[str, object]


def usage(event: SequenceEvent) -> JSON:
    """The `usage` object of a request whose latest event is `event`."""
    return {"prompt_tokens": event.num_prompt_tokens,
            "completion_tokens": event.num_output_tokens,
            "total_tokens": event.num_prompt_tokens + event.num_output_tokens}


def _finish(reason: FinishReason | None) -> str | None:
    # A request cut short by a shutdown ends as if its limit were reached: OpenAI has no other
    # reason a client would understand.
    return "length" if reason == "cancelled" else reason


class ResponseMaker:
    """Builds one request's response objects.

    Attributes:
        request_id: `cmpl-...` or `chatcmpl-...`.
        model: The model name echoed back.
        created: Unix time of the request.
        chat: Chat completion objects, else text completions.
    """

    def __init__(self, request_id: str, model: str, created: int, chat: bool,
                 token_text: TokenText) -> None:
        self.request_id = request_id
        self.model = model
        self.created = created
        self.chat = chat
        self._token_text = token_text
        self._text_offset = 0

    def _envelope(self, chunk: bool) -> JSON:
        kind = "chat.completion" if self.chat else "text_completion"
        if chunk and self.chat:
            kind = "chat.completion.chunk"
        return {"id": self.request_id, "object": kind, "created": self.created,
                "model": self.model}

    def response(self, text: str, last: SequenceEvent,
                 logprobs: Sequence[TokenLogprob] | None) -> JSON:
        """The whole (non-streaming) response."""
        choice: JSON = {"index": 0, "finish_reason": _finish(last.finish_reason),
                        "logprobs": self._logprobs(logprobs, text)}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {**self._envelope(False), "choices": [choice], "usage": usage(last)}

    def first_chunk(self) -> JSON | None:
        """The chunk that opens a chat stream (the assistant's role); None for completions."""
        if not self.chat:
            return None
        return {**self._envelope(True), "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
             "finish_reason": None}]}

    def chunk(self, event: SequenceEvent) -> JSON | None:
        """The stream chunk of one event (None when it carries nothing to send)."""
        finish = _finish(event.finish_reason)
        if not event.text and finish is None and event.logprobs is None:
            return None
        choice: JSON = {"index": 0, "finish_reason": finish,
                        "logprobs": self._logprobs(event.logprobs, event.text)}
        if self.chat:
            choice["delta"] = {"content": event.text} if event.text or finish is None else {}
        else:
            choice["text"] = event.text
        return {**self._envelope(True), "choices": [choice]}

    def usage_chunk(self, last: SequenceEvent) -> JSON:
        """The stream's last chunk when `stream_options.include_usage`: no choices, the usage."""
        return {**self._envelope(True), "choices": [], "usage": usage(last)}

    def _logprobs(self, entries: Sequence[TokenLogprob] | None, text: str) -> JSON | None:
        if entries is None:
            return None
        if self.chat:
            return {"content": [self._chat_entry(e) for e in entries]}
        tokens = [self._token_text(e.token_id) for e in entries]
        offsets = []
        for token in tokens:
            offsets.append(self._text_offset)
            self._text_offset += len(token)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{self._token_text(i): lp for i, lp in e.top} for e in entries],
                "text_offset": offsets}

    def _chat_entry(self, entry: TokenLogprob) -> JSON:
        token = self._token_text(entry.token_id)
        return {"token": token, "logprob": entry.logprob, "bytes": list(token.encode()),
                "top_logprobs": [{"token": (t := self._token_text(i)), "logprob": lp,
                                  "bytes": list(t.encode())} for i, lp in entry.top]}
