"""Page-locked host tensors of exactly the size asked for.

torch's pinned allocator (`torch.empty(..., pin_memory=True)`) rounds every request up to a
power of two and keeps freed blocks cached: on the H200 machine a Qwen3-30B-A3B store of 48
arenas of 1.2 GB each took 2 GB each, 96 GB of pinned memory for 58 GB of experts (measured as
a 17.8 GB peak resident size for a 9.7 GB store), and the host ran out of memory. Instead the
arena is an ordinary host allocation registered with the CUDA driver (`cudaHostRegister`):
exact size, same copy speed.

Lifetime: the allocation is a numpy buffer that the tensor's storage owns (`torch.from_numpy`),
so it lives exactly as long as any tensor or view of it. The registration is undone by a
finalizer on that buffer, which runs when the last view is gone and before the memory is freed.
"""

from __future__ import annotations

import contextlib
import weakref

import numpy as np
import torch

__all__ = ["pinned_empty"]


def pinned_empty(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised 1-D host tensor of `numel` elements in page-locked memory.

    Falls back to torch's (rounding) pinned allocator where registration fails.

    Raises:
        RuntimeError: CUDA is not available.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("page-locked memory needs CUDA")
    nbytes = numel * torch.empty(0, dtype=dtype).element_size()
    if nbytes == 0:
        return torch.empty(0, dtype=dtype, pin_memory=True)
    buffer = np.empty(nbytes, dtype=np.uint8)
    ptr = buffer.ctypes.data
    try:
        registered = _code(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0))
    except (AttributeError, RuntimeError, TypeError):  # a torch build without the binding
        registered = -1
    if registered != 0:
        return torch.empty(numel, dtype=dtype, pin_memory=True)
    # Not at interpreter exit: the CUDA context may be gone, and the process frees everything.
    finalizer = weakref.finalize(buffer, _unregister, ptr)
    finalizer.atexit = False
    return torch.from_numpy(buffer).view(dtype)  # the storage holds `buffer`


def _unregister(ptr: int) -> None:
    with contextlib.suppress(RuntimeError):  # CUDA already torn down
        torch.cuda.cudart().cudaHostUnregister(ptr)


def _code(result: object) -> int:
    """The integer of a `cudaError_t` (an int or a pybind11 enum)."""
    return int(getattr(result, "value", result))  # type: ignore[call-overload]
