"""The CUDA copy engine's host-side logic (prefetch window, promotion, cancellation, drain) on CPU,
against a fake CuPy whose streams run only when the test says so."""

from __future__ import annotations

import ctypes
import sys
import types
from typing import ClassVar
from unittest import mock

import pytest
import torch
from moe_core.offload.copy_engine import CopyEngine, CopyLane


class FakeEvent:
    """A CUDA event that fires when its stream reaches it."""

    registry: ClassVar[dict[int, FakeEvent]] = {}

    def __init__(self, block: bool = False, disable_timing: bool = False) -> None:
        self.ptr = len(self.registry) + 1
        self.registry[self.ptr] = self
        self.done = False
        self.at = 0

    def synchronize(self) -> None:
        raise AssertionError("the engine must not block on an event")


class FakeRuntime:
    """The `cupy.cuda.runtime` calls the engine makes; streams are lists of pending ops."""

    streamNonBlocking = 1  # CuPy's names
    memcpyHostToDevice = 1

    def __init__(self) -> None:
        self.streams: dict[int, list[types.FunctionType]] = {}
        self.priorities: dict[int, int] = {}
        self.bytes_moved = 0
        self.waits: list[tuple[int, int]] = []  # (stream, event) of each streamWaitEvent

    def streamCreateWithPriority(self, flags: int, priority: int) -> int:
        ptr = 100 + len(self.streams)
        self.streams[ptr], self.priorities[ptr] = [], priority
        return ptr

    def memcpyAsync(self, dst: int, src: int, n: int, kind: int, stream: int) -> None:
        def op() -> None:
            ctypes.memmove(dst, src, n)
            self.bytes_moved += n
        self.streams[stream].append(op)

    def eventRecord(self, event: int, stream: int) -> None:
        fake = FakeEvent.registry[event]

        def op() -> None:
            fake.done, fake.at = True, self.bytes_moved
        if stream in self.streams:
            self.streams[stream].append(op)
        else:
            op()  # torch's (fake) current stream has nothing pending

    def streamWaitEvent(self, stream: int, event: int, flags: int = 0) -> None:
        self.waits.append((stream, event))

    def streamSynchronize(self, stream: int) -> None:
        self.run(stream)

    def streamDestroy(self, stream: int) -> None:
        del self.streams[stream]

    def run(self, stream: int, ops: int | None = None) -> None:
        pending = self.streams[stream]
        for _ in range(len(pending) if ops is None else ops):
            pending.pop(0)()


@pytest.fixture()
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeRuntime:
    runtime = FakeRuntime()
    device = mock.MagicMock()
    cuda = types.SimpleNamespace(runtime=runtime, Event=FakeEvent, Device=lambda i: device,
                                 get_elapsed_time=lambda a, b: (b.at - a.at) / 1e6)
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(cuda=cuda))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: mock.Mock(cuda_stream=7))
    return runtime


def make_engine():  # type: ignore[no-untyped-def]
    from moe_core.offload.cuda_copy_engine import CudaCopyEngine

    # Host tensors stand in for device ones: the fake memcpy is a memmove.
    with mock.patch.object(CudaCopyEngine, "_check", lambda self, src, dst: None):
        engine = CudaCopyEngine("cuda", prefetch_window=2)
    engine._check = lambda src, dst: None  # type: ignore[method-assign]
    return engine


def test_window_promotion_cancellation_and_drain(fake: FakeRuntime) -> None:
    engine = make_engine()
    assert isinstance(engine, CopyEngine)
    demand, prefetch = (engine._stream_ptr[lane] for lane in (CopyLane.DEMAND, CopyLane.PREFETCH))
    assert fake.priorities[demand] < fake.priorities[prefetch]  # lower number = more urgent
    src = [torch.full((256,), float(i + 1)) for i in range(6)]
    dst = [torch.zeros(256) for _ in range(6)]
    tickets = [engine.submit(src[i], dst[i], CopyLane.PREFETCH, key=i) for i in range(5)]
    assert engine.queued == 3  # two in the window, three on the host
    urgent = engine.submit(src[5], dst[5], CopyLane.DEMAND, key="d")
    assert engine.cancel(tickets[4]) and not engine.cancel(tickets[0])
    engine.wait(tickets[3])  # still host-queued: promoted to the demand stream
    assert engine.promotions == 1 and tickets[3].lane is CopyLane.DEMAND
    fake.run(demand)
    assert torch.equal(dst[5], src[5]) and torch.equal(dst[3], src[3])
    assert not torch.equal(dst[0], src[0])  # the prefetch stream has not moved yet
    assert urgent.done is False
    engine.poll()
    assert urgent.done and engine.is_complete(tickets[3])
    fake.run(prefetch, ops=3)  # start event, copy, end event of the first prefetch
    engine.poll()
    assert tickets[0].done and engine.queued == 0  # the window was topped up with ticket 2
    with pytest.raises(ValueError, match="cancelled"):
        engine.wait(tickets[4])
    engine.drain()
    assert all(torch.equal(dst[i], src[i]) for i in (0, 1, 2, 3, 5))
    assert torch.equal(dst[4], torch.zeros(256))
    assert engine.bytes_copied == 5 * 256 * 4
    assert engine.copy_seconds == pytest.approx(5 * 256 * 4 / 1e9)
    engine.close()


def test_a_copy_into_some_slots_of_a_released_multi_slot_copy_waits_for_their_readers(
        fake: FakeRuntime) -> None:
    """Fences are kept per row of a `[C, N]` destination: a later copy whose slots overlap an
    earlier copy of several experts waits for that copy's release wherever it starts, once per
    event, and a copy into slots no release covers waits for nothing."""
    engine = make_engine()
    demand = engine._stream_ptr[CopyLane.DEMAND]
    slots = torch.zeros(5, 8)  # [S, N]
    host = torch.arange(40, dtype=torch.float32).view(5, 8)
    chunk = engine.submit(host[0:3], slots[0:3], CopyLane.DEMAND, key="rows 0-2")
    fake.waits.clear()
    engine.release(chunk)
    released = max(FakeEvent.registry)  # the event `release` just recorded
    engine.submit(host[4], slots[4], CopyLane.DEMAND, key="row 4")
    assert fake.waits == []
    engine.submit(host[1], slots[1], CopyLane.DEMAND, key="row 1")
    assert fake.waits == [(demand, released)]
    engine.submit(host[2:4], slots[2:4], CopyLane.DEMAND, key="rows 2-3")
    assert fake.waits == [(demand, released)] * 2
    engine.submit(host[0:2], slots[0:2], CopyLane.DEMAND, key="rows 0-1")
    assert fake.waits == [(demand, released)] * 3  # row 0 still fenced, row 1's was used
    engine.submit(host[0:2], slots[0:2], CopyLane.DEMAND, key="rows 0-1 again")
    assert len(fake.waits) == 3
    engine.drain()
    assert torch.equal(slots, host)


def test_missing_cupy_names_the_extras(monkeypatch: pytest.MonkeyPatch) -> None:
    from moe_core.offload.cuda_copy_engine import CudaCopyEngine

    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    with pytest.raises(RuntimeError, match=r"moe-core\[cuda12\].*moe-core\[cuda13\]"):
        CudaCopyEngine("cuda")
