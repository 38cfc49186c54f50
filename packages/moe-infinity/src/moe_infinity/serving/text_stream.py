"""A request's generated text, released piece by piece as tokens arrive, with stop strings.

Text is decoded from all of the request's tokens each time (so a character split over two
tokens comes out whole), and held back while its end could still become a stop string or is an
incomplete character. The stop string itself is never released (OpenAI's behaviour).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = ["TextDecoder", "TextStream"]

_INCOMPLETE = "\ufffd"  # what a tokenizer decodes half a UTF-8 character to


TextDecoder = Callable[[list[int]], str]
"""Text of token ids, special tokens skipped (a tokenizer's `decode`)."""


class TextStream:
    """Text of one request's tokens, with stop-string detection.

    Attributes:
        stopped: Whether a stop string appeared.
    """

    def __init__(self, decode: TextDecoder, stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stop = tuple(s for s in stop if s)
        self._ids: list[int] = []
        self._released = 0  # characters of the decoded text handed out so far
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; return the text that is now safe to release (maybe empty)."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        text = self._decode(self._ids)
        end = self._first_stop(text)
        if end is not None:
            self.stopped = True
            return self._release(text, end)
        safe = len(text) - self._held_back(text)
        return self._release(text, safe)

    def flush(self) -> str:
        """At the end of the request: the text still held back (none after a stop string)."""
        if self.stopped or not self._ids:
            return ""
        text = self._decode(self._ids)
        return self._release(text, len(text))

    def _release(self, text: str, end: int) -> str:
        piece = text[self._released : end] if end > self._released else ""
        self._released = max(self._released, end)
        return piece

    def _first_stop(self, text: str) -> int | None:
        """Where the earliest stop string starts in the unreleased part's reach, if any."""
        reach = max(0, self._released - max((len(s) for s in self._stop), default=0))
        found = [i for s in self._stop if (i := text.find(s, reach)) >= 0]
        return min(found) if found else None

    def _held_back(self, text: str) -> int:
        """Characters at the end of `text` not released yet: an incomplete character, or the
        longest end that is the start of a stop string."""
        if text.endswith(_INCOMPLETE):
            return len(text) - len(text.rstrip(_INCOMPLETE))
        longest = 0
        for stop in self._stop:
            for size in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:size]):
                    longest = max(longest, size)
                    break
        return longest
