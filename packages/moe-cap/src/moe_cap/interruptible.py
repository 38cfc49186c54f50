"""Running the client's event loop so that Ctrl-C (or SIGTERM) stops it cleanly: the signal
cancels the main task (its `finally` blocks close connections and stop engines), then the
signal is raised again under the handlers the caller had (the CLI's: `interrupted`, exit 130
or 143), instead of a KeyboardInterrupt tearing through the loop's internals."""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["run_interruptible"]

T = TypeVar("T")
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def run_interruptible(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)`, with SIGINT and SIGTERM cancelling it and then re-raised."""
    if threading.current_thread() is not threading.main_thread():
        return asyncio.run(main)
    previous = {sig: signal.getsignal(sig) for sig in _SIGNALS}
    received: list[signal.Signals] = []

    async def guarded() -> T:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None

        def stop(sig: signal.Signals) -> None:
            if not received:
                received.append(sig)
                task.cancel()

        for sig in _SIGNALS:
            loop.add_signal_handler(sig, stop, sig)
        try:
            return await main
        finally:
            for sig in _SIGNALS:
                loop.remove_signal_handler(sig)

    try:
        return asyncio.run(guarded())
    except asyncio.CancelledError:
        if not received:
            raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    signal.raise_signal(received[0])  # the caller's handler decides what an interrupt means
    raise KeyboardInterrupt  # a caller that ignores the signal still sees the run stop
