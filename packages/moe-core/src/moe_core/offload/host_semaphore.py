"""A POSIX semaphore the GPU's stream can post and wait on, without Python and without the GIL.

Why: the CPU lane of decode (`cpu_lane`) must start when a layer's routing has reached host
memory and the GPU must not add the lane's result before it is written, in eager steps and in
CUDA-graph-captured ones, without a host synchronisation per layer. A CUDA host function does
that: enqueued on the stream (`cuLaunchHostFunc`; in a capture it becomes a host node of the
graph), it runs on the driver's callback thread when the stream reaches it, and the stream waits
for it to return. The host functions here are libc's own `sem_post` and `sem_wait` (their C
signature `int f(sem_t *)` is called as `void f(void *)`, which the x86-64 and AArch64 calling
conventions make the same call), so the callback thread never needs the GIL: a Python callback
would wait for it behind the main thread, up to the interpreter's switch interval (5 ms).

On the host side the same semaphore is posted and awaited through ctypes, which releases the GIL
for the call.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import sys
from functools import cache
from typing import Any

__all__ = ["HostSemaphore", "host_semaphores_unsupported"]

_SEM_BYTES = 64  # sizeof(sem_t) is 32 on 64-bit glibc; room to spare, 8-byte aligned


@cache
def _libc() -> Any:
    lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    for name in ("sem_init", "sem_post", "sem_wait", "sem_destroy"):
        getattr(lib, name).restype = ctypes.c_int
    lib.sem_init.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint]
    for name in ("sem_post", "sem_wait", "sem_destroy"):
        getattr(lib, name).argtypes = [ctypes.c_void_p]
    return lib


@cache
def _libcuda() -> Any:
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuLaunchHostFunc.restype = ctypes.c_int
    lib.cuLaunchHostFunc.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    return lib


def host_semaphores_unsupported(cuda: bool) -> str | None:
    """Why host semaphores cannot be used here (`cuda`: also by a CUDA stream), or None."""
    if not sys.platform.startswith("linux"):
        return f"host semaphores need Linux (this is {sys.platform})"
    try:
        _libc()
    except (OSError, AttributeError) as exc:
        return f"libc's semaphores are unavailable ({exc})"
    if cuda:
        try:
            _libcuda()
        except (OSError, AttributeError) as exc:
            return f"the CUDA driver's cuLaunchHostFunc is unavailable ({exc})"
    return None


class HostSemaphore:
    """One unnamed POSIX semaphore (initially 0), posted or awaited by the host or by a stream."""

    def __init__(self) -> None:
        reason = host_semaphores_unsupported(cuda=False)
        if reason is not None:
            raise RuntimeError(reason)
        self._memory = (ctypes.c_int64 * (_SEM_BYTES // 8))()  # kept alive with the object
        self._address = ctypes.addressof(self._memory)
        if _libc().sem_init(self._address, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "sem_init failed")

    def post(self) -> None:
        """Add one (from the host)."""
        if _libc().sem_post(self._address) != 0:
            raise OSError(ctypes.get_errno(), "sem_post failed")

    def wait(self) -> None:
        """Take one, blocking without the GIL until there is one (from the host)."""
        lib = _libc()
        while lib.sem_wait(self._address) != 0:
            if ctypes.get_errno() != errno.EINTR:  # a signal handler ran: wait again
                raise OSError(ctypes.get_errno(), "sem_wait failed")

    def post_on_stream(self, stream: int) -> None:
        """Enqueue a post on the CUDA stream `stream` (a `cudaStream_t` as an int)."""
        self._launch(stream, "sem_post")

    def wait_on_stream(self, stream: int) -> None:
        """Enqueue a wait on the CUDA stream `stream`: the stream stops there until the
        semaphore is posted (by the host)."""
        self._launch(stream, "sem_wait")

    def _launch(self, stream: int, function: str) -> None:
        address = ctypes.cast(getattr(_libc(), function), ctypes.c_void_p).value
        status = _libcuda().cuLaunchHostFunc(stream or None, address, self._address)
        if status != 0:
            raise RuntimeError(f"cuLaunchHostFunc({function}) failed with CUDA error {status}")

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: libc may be gone
            _libc().sem_destroy(self._address)
