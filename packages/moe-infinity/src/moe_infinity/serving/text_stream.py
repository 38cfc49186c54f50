"""A request's generated text, released piece by piece as tokens arrive, with stop strings.

The text released is that of the whole output decoded at once, cut the same way at every token:
held back while its end could still become a stop string or is an incomplete character (a
tokenizer decodes half a UTF-8 character to U+FFFD), and never the stop string itself (OpenAI's
behaviour).

Decoding the whole output at every token costs O(n) per token, O(n^2) per request (0.3 ms a
token at 512 tokens on the S3 server, on the critical path of every step). So each token decodes
a bounded window instead (the prefix-offset/read-offset technique of incremental detokenisers):

- the output's tokens are committed up to a point where its text ended in a whole character;
  the text of the tokens after it, the tail, is the window's text after its context's;
- the window is the tokens after the commit point, led by the context: the tokens of the latest
  commit whose text is not empty. Decoders that treat the first token apart (SentencePiece's
  leading space, stripped from a text's first token) treat the context's first token apart in
  both decodes, so it cancels out; a context with no text would let the tail's first token be
  stripped, hence "not empty";
- tokens are committed when the text no longer ends in U+FFFD; until then the window grows with
  the held-back bytes of a character (at most a few tokens).

Only the text that stop strings can still reach is kept: the unreleased text, and as many
characters before it as the longest stop string. Where the window's text does not begin with its
context's (a decoder that rewrites text across tokens, e.g. `clean_up_tokenization_spaces`),
that token decodes the whole output as before, so the released text stays the whole decode's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

__all__ = ["TextDecoder", "TextStream"]

_INCOMPLETE = "\ufffd"  # what a tokenizer decodes half a UTF-8 character to


TextDecoder = Callable[[list[int]], str]
"""Text of token ids, special tokens skipped (a tokenizer's `decode`)."""


class TextStream:
    """Text of one request's tokens, with stop-string detection.

    Offsets are in characters of the whole output's text.

    Attributes:
        stopped: Whether a stop string appeared.
    """

    def __init__(self, decode: TextDecoder, stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stop = tuple(s for s in stop if s)
        self._reach = max((len(s) for s in self._stop), default=0)
        self._ids: list[int] = []
        self._context = 0  # first token of the window
        self._committed = 0  # first token not committed
        self._context_text = ""  # text of the window's committed tokens, decoded alone
        self._kept = ""  # the committed text from `_kept_at` on (what stop strings can reach)
        self._kept_at = 0
        self._released = 0  # characters handed out so far
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; return the text that is now safe to release (maybe empty)."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        text, window = self._text()
        end = self._first_stop(text)
        if end is not None:
            self.stopped = True
            return self._release(text, end)
        piece = self._release(text, self._kept_at + len(text) - self._held_back(text))
        if not text.endswith(_INCOMPLETE):
            self._commit(text, window)
        return piece

    def flush(self) -> str:
        """At the end of the request: the text still held back (none after a stop string)."""
        if self.stopped or not self._ids:
            return ""
        text, _ = self._text()
        return self._release(text, self._kept_at + len(text))

    def _text(self) -> tuple[str, str | None]:
        """The output's text from `_kept_at` on, and the window's text (None where the window
        does not extend its context's text, and the whole output was decoded instead)."""
        window = self._decode(self._ids[self._context :])
        if window.startswith(self._context_text):
            return self._kept + window[len(self._context_text) :], window
        return self._decode(self._ids)[self._kept_at :], None

    def _commit(self, text: str, window: str | None) -> None:
        """Commit every token: `text` (from `_kept_at`) ends in a whole character."""
        keep_from = max(self._kept_at, self._released - self._reach)
        self._kept = text[keep_from - self._kept_at :]
        self._kept_at = keep_from
        latest = self._decode(self._ids[self._committed :])
        if latest:
            self._context, self._context_text = self._committed, latest
        else:  # an empty context would not shield the next token: keep the one before
            self._context_text = (window if window is not None
                                  else self._decode(self._ids[self._context :]))
        self._committed = len(self._ids)

    def _release(self, text: str, end: int) -> str:
        """The text up to offset `end` not released yet (`text` starts at `_kept_at`)."""
        start = self._released
        self._released = max(start, end)
        return text[start - self._kept_at : end - self._kept_at] if end > start else ""

    def _first_stop(self, text: str) -> int | None:
        """Where the earliest stop string starts in the unreleased part's reach, if any."""
        reach = max(0, self._released - self._reach) - self._kept_at
        found = [i for s in self._stop if (i := text.find(s, reach)) >= 0]
        return self._kept_at + min(found) if found else None

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
