"""Launching CuPy kernels on torch's streams: the one place that wraps a torch stream for CuPy
and compiles a raw kernel once (the mapped fetch and the mapped row gather use it)."""

from __future__ import annotations

import contextlib
import warnings
from types import ModuleType
from typing import Any

import torch

__all__ = ["CupyLauncher", "host_pointers_unsupported"]


class _StreamProtocol:
    """The CUDA stream protocol (`__cuda_stream__`) for a bare stream pointer."""

    def __init__(self, ptr: int) -> None:
        self._ptr = ptr

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self._ptr)


def host_pointers_unsupported(device: torch.device) -> str | None:
    """Why a kernel on CUDA `device` cannot read pinned host memory through its host address,
    or None when it can (CuPy present, unified virtual addressing)."""
    try:
        import cupy
    except ImportError:
        return "reading host memory from the GPU needs CuPy (moe-core[cuda12] or moe-core[cuda13])"
    index = device.index if device.index is not None else torch.cuda.current_device()
    # cudaDevAttrCanUseHostPointerForRegisteredMem: registered host memory has the same
    # address on the device (unified virtual addressing).
    if not cupy.cuda.runtime.deviceGetAttribute(91, index):
        return "this GPU cannot use host pointers of registered memory"
    return None


class CupyLauncher:
    """One raw CUDA kernel of `source`, launched on torch's current stream of `device`.

    Attributes:
        cupy: The CuPy module (its scalar types build the kernel's arguments).
    """

    def __init__(self, device: torch.device, source: str, name: str) -> None:
        """Raises:
            ImportError: CuPy is not installed.
        """
        import cupy

        self.cupy: ModuleType = cupy
        self._index = device.index if device.index is not None else torch.cuda.current_device()
        self._source = source
        self._name = name
        self._kernel: Any = None  # compiled at the first launch
        self._streams: dict[int, Any] = {}  # stream pointer -> CuPy wrapper

    def __call__(self, device: torch.device, grid: tuple[int, ...], block: tuple[int, ...],
                 args: tuple[Any, ...]) -> None:
        """Launch on torch's current stream of `device`."""
        cupy = self.cupy
        if self._kernel is None:
            self._kernel = cupy.RawKernel(self._source, self._name)
        ptr = torch.cuda.current_stream(device).cuda_stream
        stream = self._streams.get(ptr)
        if stream is None:
            stream = self._streams[ptr] = self._wrap_stream(ptr)
        with cupy.cuda.Device(self._index), stream:
            self._kernel(grid, block, args)

    def _wrap_stream(self, ptr: int) -> Any:
        """A CuPy handle of the CUDA stream `ptr` (owned by torch)."""
        cupy = self.cupy
        from_external = getattr(cupy.cuda.Stream, "from_external", None)
        if from_external is not None:
            with contextlib.suppress(TypeError, ValueError):
                return from_external(_StreamProtocol(ptr))
        with warnings.catch_warnings():  # deprecated in CuPy 14, the only way before it
            warnings.simplefilter("ignore", DeprecationWarning)
            return cupy.cuda.ExternalStream(ptr, self._index)
