"""A word of pinned host memory that a CUDA stream writes and waits on, and a host thread spins
on, with no host function, no driver callback thread and no GIL in between.

Why: the CPU lane of decode hands each layer call over and back (`lane_signals`). Through host
functions (`host_semaphore`) the stream stops at each host node until the driver's callback
thread has run it, and the worker wakes from a futex: on the H200 machine an empty job's round
trip took 133 us that way against 81 us with flags (eager, launches included), and a captured
S3 step 20.9 ms against 18.3 ms (decision 0009). Here the stream writes the word with `cuStreamWriteValue32` (after a
system-wide fence, so the staging copies before it have landed) and waits on it with
`cuStreamWaitValue32` (the stream's front end polls it; no SM is held), both captured into CUDA
graphs as memory-operation nodes; the host side reads and writes it with atomic loads and stores
from numba-compiled code that releases the GIL, spinning while a decode step is in flight.

Dimension key: none (one 32-bit word).
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable
from functools import cache
from typing import Any

import torch

__all__ = ["HostFlag", "host_flags_unsupported"]

_WAIT_EQ = 0x1  # CU_STREAM_WAIT_VALUE_EQ
_WRITE_DEFAULT = 0x0  # CU_STREAM_WRITE_VALUE_DEFAULT: a fence before the write
SPIN_READS = 2_000_000
"""Reads per spin before the waiter comes back to Python (about a millisecond): each return
takes the GIL, which an eager decode step's launching thread then has to give up (the H200 run's
eager two-lane step was 1.7x slower with flags than with host functions at 100,000 reads)."""
IDLE_AFTER_S = 0.05
"""A waiter that has spun this long without a change starts sleeping between spins."""
IDLE_SLEEP_S = 0.001
"""Its sleep between spins (the first hand-over after an idle spell is late by up to this)."""


@cache
def _libcuda() -> Any:
    lib = ctypes.CDLL("libcuda.so.1")
    for name in ("cuStreamWriteValue32_v2", "cuStreamWaitValue32_v2"):
        fn = getattr(lib, name)
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
    lib.cuMemHostGetDevicePointer_v2.restype = ctypes.c_int
    lib.cuMemHostGetDevicePointer_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64),
                                                 ctypes.c_void_p, ctypes.c_uint]
    return lib


@cache
def _atomics() -> tuple[Callable[[int, int], int], Callable[[int, int], None]]:
    """(spin, store): `spin(address, reads)` the word once nonzero, or 0 after `reads` atomic
    acquire loads; `store(address, value)` an atomic release store. Both compiled without the
    GIL (compiled once per process: call before a hand-over is timed)."""
    import numba
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def _load(typingctx: Any, address: Any) -> Any:
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            pointer = builder.inttoptr(args[0], ir.IntType(32).as_pointer())
            return builder.load_atomic(pointer, "acquire", 4)
        return types.int32(types.int64), codegen

    @intrinsic
    def _store(typingctx: Any, address: Any, value: Any) -> Any:
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            pointer = builder.inttoptr(args[0], ir.IntType(32).as_pointer())
            builder.store_atomic(builder.trunc(args[1], ir.IntType(32)), pointer, "release", 4)
            return context.get_dummy_value()
        return types.void(types.int64, types.int64), codegen

    @numba.njit(nogil=True)
    def spin(address: int, reads: int) -> int:
        for _ in range(reads):
            value: int = _load(address)  # type: ignore[call-arg]
            if value != 0:
                return int(value)
        return 0

    @numba.njit(nogil=True)
    def store(address: int, value: int) -> None:
        _store(address, value)  # type: ignore[call-arg]

    spin(_scratch_address(), 1)  # compile now, not in a timed hand-over
    store(_scratch_address(), 0)
    return spin, store


_SCRATCH = (ctypes.c_int32 * 1)()


def _scratch_address() -> int:
    return ctypes.addressof(_SCRATCH)


def host_flags_unsupported(cuda: bool) -> str | None:
    """Why host flags cannot be used here (`cuda`: also by a CUDA stream), or None."""
    try:
        _atomics()
    except ImportError as exc:
        return f"host flags need numba ({exc})"
    if cuda:
        try:
            _libcuda()
        except (OSError, AttributeError) as exc:
            return f"the CUDA driver's stream memory operations are unavailable ({exc})"
    return None


class HostFlag:
    """One 32-bit word (initially 0) in pinned host memory where `device` is CUDA.

    Attributes:
        word: `[1]` int32, the host memory (kept alive with the flag).
    """

    def __init__(self, device: torch.device) -> None:
        reason = host_flags_unsupported(cuda=device.type == "cuda")
        if reason is not None:
            raise RuntimeError(reason)
        self._spin, self._store = _atomics()
        self.word = torch.zeros(1, dtype=torch.int32, pin_memory=device.type == "cuda")
        self._address = self.word.data_ptr()
        self._device_address = self._address
        if device.type == "cuda":
            pointer = ctypes.c_uint64()
            status = _libcuda().cuMemHostGetDevicePointer_v2(ctypes.byref(pointer),
                                                             self._address, 0)
            if status != 0:
                raise RuntimeError(f"cuMemHostGetDevicePointer failed with CUDA error {status}")
            self._device_address = pointer.value

    # The host's side ------------------------------------------------------------------------

    def set(self, value: int) -> None:
        """Store `value` (release: the host's writes before it are seen before it)."""
        self._store(self._address, value)

    def take(self) -> int:
        """Wait until the word is nonzero, reset it to 0 and return what it held. Spins without
        the GIL; after `IDLE_AFTER_S` without a change it sleeps between spins."""
        spun_since = None
        while True:
            value = self._spin(self._address, SPIN_READS)
            if value != 0:
                self._store(self._address, 0)
                return value
            now = time.perf_counter()
            if spun_since is None:
                spun_since = now
            elif now - spun_since > IDLE_AFTER_S:
                time.sleep(IDLE_SLEEP_S)

    # The stream's side ----------------------------------------------------------------------

    def set_on_stream(self, stream: int, value: int) -> None:
        """Enqueue on the CUDA stream `stream`: store `value` once everything before it on the
        stream has run and its writes are visible to the host."""
        status = _libcuda().cuStreamWriteValue32_v2(stream or None, self._device_address,
                                                    value & 0xFFFFFFFF, _WRITE_DEFAULT)
        if status != 0:
            raise RuntimeError(f"cuStreamWriteValue32 failed with CUDA error {status}")

    def take_on_stream(self, stream: int, value: int) -> None:
        """Enqueue on `stream`: wait until the word equals `value` (nonzero), then reset it."""
        status = _libcuda().cuStreamWaitValue32_v2(stream or None, self._device_address,
                                                   value & 0xFFFFFFFF, _WAIT_EQ)
        if status != 0:
            raise RuntimeError(f"cuStreamWaitValue32 failed with CUDA error {status}")
        self.set_on_stream(stream, 0)
