"""The load generator: offers a workload to a target in a closed or open loop and measures each
request on the client's clock (`time.perf_counter`), handing each result on as it ends."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Iterator, Sequence

from moe_cap.errors import TargetError
from moe_cap.load_pattern import LoadPattern, poisson_arrivals
from moe_cap.request_result import RequestResult
from moe_cap.target import Completion, GenerationSettings, Target
from moe_cap.workload import WorkItem

__all__ = ["drive", "measured"]

OnResult = Callable[[RequestResult], None]


def measured(item: WorkItem, index: int, run_start: float, sent: float, ended: float,
             completion: Completion | None, error: str | None) -> RequestResult:
    """A request's row from its send and end times and what the target returned."""
    if completion is None:
        return RequestResult(item.id, index, sent - run_start, None, None, (), None, 0, None,
                             error)
    times = completion.token_times
    ttft = times[0] - sent if times else None
    itl = tuple(b - a for a, b in itertools.pairwise(times))
    tokens = completion.output_tokens if completion.output_tokens is not None else len(times)
    return RequestResult(item.id, index, sent - run_start, ended - sent, ttft, itl,
                         completion.prompt_tokens, tokens, completion.finish_reason, None,
                         completion.text)


class _Feed:
    """The requests to send: the workload in order, cycled, until the count or the time is up."""

    def __init__(self, items: Sequence[WorkItem], load: LoadPattern, started: float) -> None:
        self._items: Iterator[WorkItem] = itertools.cycle(items)
        self._left = load.num_requests if load.num_requests is not None else (
            None if load.duration_s is not None else len(items))
        self._deadline = None if load.duration_s is None else started + load.duration_s
        self.sent = 0

    def next(self) -> tuple[int, WorkItem] | None:
        if self._left is not None and self.sent >= self._left:
            return None
        if self._deadline is not None and time.perf_counter() >= self._deadline:
            return None
        self.sent += 1
        return self.sent - 1, next(self._items)


async def drive(target: Target, items: Sequence[WorkItem], load: LoadPattern,
                settings: GenerationSettings, on_result: OnResult) -> float:
    """Send the workload under `load`; returns the run's wall seconds (first send to last end).

    A failed request (TargetError) is a row with its error; the run goes on.
    """
    started = time.perf_counter()
    feed = _Feed(items, load, started)

    async def one(index: int, item: WorkItem) -> None:
        sent = time.perf_counter()
        try:
            completion = await target.complete(item, settings)
        except TargetError as exc:
            on_result(measured(item, index, started, sent, time.perf_counter(), None, str(exc)))
            return
        on_result(measured(item, index, started, sent, time.perf_counter(), completion, None))

    if load.rate_per_s is None:
        async def client() -> None:
            while (nxt := feed.next()) is not None:
                await one(*nxt)

        await asyncio.gather(*(client() for _ in range(load.concurrency or 1)))
    else:
        limit = asyncio.Semaphore(load.concurrency) if load.concurrency else None

        async def capped(index: int, item: WorkItem) -> None:
            if limit is None:
                await one(index, item)
                return
            async with limit:
                await one(index, item)

        tasks = []
        for arrival in poisson_arrivals(load.rate_per_s, load.seed):
            delay = started + arrival - time.perf_counter()
            if load.duration_s is not None and arrival >= load.duration_s:
                break
            if delay > 0:
                await asyncio.sleep(delay)
            nxt = feed.next()
            if nxt is None:
                break
            tasks.append(asyncio.create_task(capped(*nxt)))
        await asyncio.gather(*tasks)
    return time.perf_counter() - started
