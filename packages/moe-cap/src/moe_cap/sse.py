"""Server-sent events, as OpenAI-compatible servers stream them: `data: <json>` lines, events
separated by a blank line, `:` comments ignored, `data: [DONE]` at the end."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator

__all__ = ["DONE", "SseDecoder", "aiter_events"]

DONE = "[DONE]"


class SseDecoder:
    """Turns lines into the `data` payloads of complete events (multi-line data joined by
    newlines, per the SSE specification)."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> str | None:
        """Take one line (without its newline); the event's data when `line` ends one."""
        line = line.rstrip("\r")
        if not line:
            return self.flush()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value.removeprefix(" "))
        return None

    def flush(self) -> str | None:
        """The pending event's data, if any (also at the end of the stream)."""
        if not self._data:
            return None
        data, self._data = "\n".join(self._data), []
        return data

    def events(self, lines: Iterable[str]) -> Iterator[str]:
        """Every event's data in `lines`, the last one flushed."""
        for line in lines:
            data = self.feed(line)
            if data is not None:
                yield data
        last = self.flush()
        if last is not None:
            yield last


async def aiter_events(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """Every event's data of an async line stream."""
    decoder = SseDecoder()
    async for line in lines:
        data = decoder.feed(line)
        if data is not None:
            yield data
    last = decoder.flush()
    if last is not None:
        yield last
