"""Measuring how long compute waits for copies ("stall time").

On the CPU engine a wait blocks the calling thread while the copy runs, so the host time inside
`engine.wait` is the stall. On CUDA `engine.wait` only makes the compute stream wait on the copy's
event and returns at once; the stall is the gap the stream spends blocked. Two timing events on
the compute stream, one just before the wait and one just after, measure it: the first fires when
earlier compute is done, the second when the copy has landed too. Their elapsed times are read
lazily (`collect`), never with a host sync on the hot path.
"""

from __future__ import annotations

import time

import torch

from moe_core.offload.copy_engine import CopyEngine, CopyTicket

__all__ = ["StallTimer"]


class StallTimer:
    """Waits for copies through a copy engine and sums the time compute spent waiting.

    Attributes:
        device: The compute device.
        enabled: Measure at all (two CUDA events per awaited copy on CUDA).
        seconds: Stall time collected so far.
    """

    def __init__(self, device: torch.device, enabled: bool = True) -> None:
        self.device = device
        self.enabled = enabled
        self.seconds = 0.0
        self._pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def wait(self, engine: CopyEngine, ticket: CopyTicket) -> None:
        """`engine.wait(ticket)`, timed."""
        if not self.enabled or ticket.done:
            engine.wait(ticket)
            return
        if self.device.type != "cuda":
            start = time.perf_counter()
            engine.wait(ticket)
            self.seconds += time.perf_counter() - start
            return
        before = torch.cuda.Event(enable_timing=True)
        after = torch.cuda.Event(enable_timing=True)
        before.record()
        engine.wait(ticket)
        after.record()
        self._pending.append((before, after))

    def wait_all(self, engine: CopyEngine, tickets: list[CopyTicket]) -> None:
        """`engine.wait` for every ticket, timed as one stall (one pair of events on CUDA)."""
        pending = [t for t in tickets if not t.done]
        if not self.enabled or not pending or self.device.type != "cuda":
            if self.enabled and pending:
                start = time.perf_counter()
            for ticket in tickets:
                engine.wait(ticket)
            if self.enabled and pending:
                self.seconds += time.perf_counter() - start
            return
        before = torch.cuda.Event(enable_timing=True)
        after = torch.cuda.Event(enable_timing=True)
        before.record()
        for ticket in tickets:
            engine.wait(ticket)
        after.record()
        self._pending.append((before, after))

    def collect(self, block: bool = False) -> float:
        """Add the measured CUDA stalls to `seconds` and return it.

        Args:
            block: Synchronise on pending events (end of a run) instead of reading only those
                already complete.
        """
        still: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        for before, after in self._pending:
            if block:
                after.synchronize()
            if after.query():
                self.seconds += before.elapsed_time(after) / 1000.0
            else:
                still.append((before, after))
        self._pending = still
        return self.seconds
