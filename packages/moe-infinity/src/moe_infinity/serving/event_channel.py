"""The bridge from the engine thread to one request's handler on the event loop.

The engine calls `sink` on its own thread; the event is handed to the loop with
`call_soon_threadsafe` and read by the handler with `await next_event()`. A loop already closed
(the server is gone) drops the event.
"""

from __future__ import annotations

import asyncio
import contextlib

from moe_infinity.serving.request import SequenceEvent

__all__ = ["EventChannel"]


class EventChannel:
    """One request's events, from the engine thread to an asyncio handler."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[SequenceEvent] = asyncio.Queue()
        self.finished = False

    def sink(self, event: SequenceEvent) -> None:
        """Called by the engine thread."""
        # A closed loop raises RuntimeError: nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    async def next_event(self, timeout_s: float | None = None) -> SequenceEvent | None:
        """The next event, or None if none came within `timeout_s`."""
        try:
            event = await asyncio.wait_for(self._queue.get(), timeout_s)
        except TimeoutError:
            return None
        if event.finish_reason is not None:
            self.finished = True
        return event
