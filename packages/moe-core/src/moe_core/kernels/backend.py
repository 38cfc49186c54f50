"""When the Triton kernels run, and how they are built: lazily, on first use.

Why lazily: importing moe_core must not import Triton (seconds of start-up, and absent on some
machines), and Triton decides between compiling and interpreting (`TRITON_INTERPRET=1`, its CPU
interpreter) when a function is *decorated*, not when it is launched. So every kernel module keeps
its kernels as plain functions and decorates them here, on the first call, under the mode asked
for then; the decorated kernels are cached per mode, so interpreted and compiled builds coexist in
one process (CPU tests first, GPU tests after).

Triton's own standard library (`tl.sum`, `tl.max`, `tl.zeros`) is made of `@jit` functions too,
decorated when `triton` is first imported: the interpreter works only in a process that imported
Triton with `TRITON_INTERPRET=1` set (`prepare_interpreter`), and such a process cannot compile
kernels any more. Tests on CPU do that; GPU runs never do.

The mode of a call:
- `"interpreted"` when `TRITON_INTERPRET=1` is set (Triton's own switch; tests set it), whatever
  the device: Triton's interpreter runs CPU tensors and copies CUDA tensors through the host;
- `"compiled"` for CUDA tensors when Triton imports;
- None otherwise: the caller uses its torch reference.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Literal, Protocol

import torch

__all__ = [
    "INTERPRET_ENV",
    "Kernel",
    "Mode",
    "device_guard",
    "interpreter_requested",
    "jit",
    "next_power_of_2",
    "num_sms",
    "prepare_interpreter",
    "triton_importable",
    "triton_mode",
]

INTERPRET_ENV = "TRITON_INTERPRET"
"""Triton's switch to its CPU interpreter; read by `triton.jit` at decoration time."""

CPU_NUM_SMS = 2
"""Stand-in SM count off the GPU: the interpreter runs programs one after another in Python, so
grids stay at a handful of programs; the tile sizes still shrink below small test shapes."""

Mode = Literal["compiled", "interpreted"]


class Kernel(Protocol):
    """A decorated Triton kernel: `kernel[grid](*args, **constexprs)` launches it."""

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., object]: ...


def interpreter_requested() -> bool:
    """Whether Triton's interpreter is switched on in this process's environment."""
    return os.environ.get(INTERPRET_ENV, "0") == "1"


@functools.cache
def triton_importable() -> bool:
    """Whether `import triton` succeeds (tried once, on the first call that could use it)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_mode(device: torch.device) -> Mode | None:
    """How a kernel on tensors of `device` runs now, or None for the torch reference."""
    if interpreter_requested():
        return "interpreted" if triton_importable() else None
    if device.type == "cuda" and triton_importable():
        return "compiled"
    return None


def prepare_interpreter() -> bool:
    """Import Triton with its interpreter switched on; whether kernels can now be interpreted.

    False when Triton is missing, or was already imported without `TRITON_INTERPRET=1` (its
    standard library then only compiles). Call it only in a process that will not compile Triton
    kernels: after it, Triton's standard library runs only under the interpreter.
    """
    if "triton" not in sys.modules:
        with _interpret_env(True):
            if not triton_importable():
                return False
    elif not triton_importable():
        return False
    import triton.language as tl
    from triton.runtime.interpreter import (
        InterpretedFunction,
    )

    return isinstance(tl.zeros, InterpretedFunction)


@contextlib.contextmanager
def _interpret_env(interpret: bool) -> Iterator[None]:
    """Set `TRITON_INTERPRET` for the duration of a decoration, then restore it.

    Not thread-safe (it edits `os.environ`); builds happen once per mode, at the first call.
    """
    previous = os.environ.get(INTERPRET_ENV)
    os.environ[INTERPRET_ENV] = "1" if interpret else "0"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[INTERPRET_ENV]
        else:
            os.environ[INTERPRET_ENV] = previous


def jit(fns: Sequence[Callable[..., None]], mode: Mode) -> tuple[Kernel, ...]:
    """Decorate plain kernel functions with `triton.jit` for `mode`.

    Each function must be self-contained (no calls to other kernel functions) and find `tl` in its
    module's globals; the decorated copies are independent of the plain functions.
    """
    import triton

    with _interpret_env(mode == "interpreted"):
        return tuple(triton.jit(fn) for fn in fns)


@functools.cache
def _cuda_num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors to fill on `device` (`CPU_NUM_SMS` off the GPU)."""
    if device.type != "cuda":
        return CPU_NUM_SMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_num_sms(index)


def device_guard(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """Make `device` current for a launch: Triton launches on the current device's stream."""
    if device.type != "cuda" or device.index is None:
        return contextlib.nullcontext()
    if device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device.index)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= `n` (>= 1); Triton tiles have power-of-two sides."""
    return 1 << max(0, n - 1).bit_length()
