"""The packed store file: every routed expert of a model in the host store's own layout, written
once by `moe-core pack`, so a later start reads it straight into pinned arenas instead of
gathering hundreds of tensors from safetensors shards and repacking them.

File layout (little-endian):

    b"MOEPACK1"                      8 bytes, the magic
    header length H                  8 bytes, unsigned
    header                           H bytes of UTF-8 JSON (`PackedHeader`)
    zero padding                     up to the first multiple of ALIGNMENT
    arena of MoE layer l0            E * N elements of the storage dtype, then zero padding
    arena of MoE layer l1 ...        each arena starts at a multiple of ALIGNMENT

Why not map the file and register the mapping as pinned (`cudaHostRegister`): pinning a private
mapping takes copy-on-write copies of every page (twice the memory while the page cache holds the
file), and a shared read-only registration needs the file's pages to stay resident anyway.
Reading into freshly pinned arenas costs one sequential read at disk speed and keeps peak host
memory at the store's size.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moe_core.dtypes import parse_dtype
from moe_core.errors import CheckpointError
from moe_core.offload.host_store import HostExpertStore
from moe_core.offload.layout import ExpertLayout

__all__ = ["ALIGNMENT", "FORMAT_VERSION", "PackedHeader", "read_packed", "write_packed"]

MAGIC = b"MOEPACK1"
FORMAT_VERSION = 1
ALIGNMENT = 4096  # page size: arenas can be read with direct I/O and mapped page-aligned
_CHUNK_BYTES = 256 * 2**20  # read/write granularity (one Python call per chunk)

Progress = Callable[[int, int], None]
"""`progress(done_bytes, total_bytes)`, called after every chunk."""


@dataclass(frozen=True)
class PackedHeader:
    """What a store file holds.

    Attributes:
        version: `FORMAT_VERSION` of the writer.
        hidden_size: D.
        intermediate_size: I.
        dtype: Storage dtype name (`bfloat16`, ...).
        num_experts: Routed experts per MoE layer.
        moe_layers: Decoder-layer indices of the stored layers.
        offsets: Byte offset of each layer's arena, in `moe_layers` order.
        source: Where the experts came from (checkpoint folder or known shape), informative.
    """

    version: int
    hidden_size: int
    intermediate_size: int
    dtype: str
    num_experts: int
    moe_layers: tuple[int, ...]
    offsets: tuple[int, ...]
    source: str = ""

    @property
    def layout(self) -> ExpertLayout:
        """The expert block layout."""
        return ExpertLayout(self.hidden_size, self.intermediate_size, parse_dtype(self.dtype))

    @property
    def arena_bytes(self) -> int:
        """Bytes of one layer's arena (without padding)."""
        return self.num_experts * self.layout.nbytes

    @property
    def file_bytes(self) -> int:
        """Exact size of a complete file."""
        return _aligned(self.offsets[-1] + self.arena_bytes) if self.offsets else 0


def _aligned(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def _plan(layout: ExpertLayout, moe_layers: list[int], num_experts: int,
          source: str) -> tuple[PackedHeader, bytes]:
    """The header with its arena offsets, and its encoded prefix (magic + length + JSON)."""
    dtype = str(layout.dtype).removeprefix("torch.")
    draft = PackedHeader(FORMAT_VERSION, layout.hidden_size, layout.intermediate_size, dtype,
                         num_experts, tuple(moe_layers), (), source)
    # Room for the offsets' digits (at most 20 each, plus a separator) before the first arena.
    start = _aligned(len(_encode(draft)) + 22 * len(moe_layers))
    step = _aligned(num_experts * layout.nbytes)
    header = PackedHeader(**{**asdict(draft),
                             "offsets": tuple(start + i * step for i in range(len(moe_layers)))})
    prefix = _encode(header)
    assert len(prefix) <= start
    return header, prefix


def _encode(header: PackedHeader) -> bytes:
    body = json.dumps({"format": "moe-core expert store", **asdict(header)}).encode()
    return MAGIC + struct.pack("<Q", len(body)) + body


def write_packed(path: str | Path, layout: ExpertLayout, moe_layers: list[int], num_experts: int,
                 arena_of: Callable[[int], torch.Tensor], source: str = "",
                 progress: Progress | None = None) -> PackedHeader:
    """Write a store file, one layer's arena at a time.

    Args:
        path: The file to write (replaced atomically: written to `path.partial`, then renamed,
            so an interrupted pack never leaves a file that looks complete).
        layout: The expert block layout.
        moe_layers: Decoder-layer indices, in file order.
        num_experts: E.
        arena_of: `arena_of(layer)` -> that layer's 1-D host arena `[E * N]` of `layout.dtype`;
            called once per layer, so a caller can build arenas lazily and keep one in memory.
        source: Recorded in the header.
        progress: Called with bytes written so far and the total.
    """
    path = Path(path)
    header, prefix = _plan(layout, moe_layers, num_experts, source)
    partial = path.with_name(path.name + ".partial")
    total = header.arena_bytes * len(moe_layers)
    done = 0
    with partial.open("wb") as f:
        f.write(prefix)
        for layer, offset in zip(moe_layers, header.offsets, strict=True):
            arena = arena_of(layer)
            if arena.numel() * arena.element_size() != header.arena_bytes:
                raise ValueError(f"arena of layer {layer} holds {arena.numel()} elements, "
                                 f"expected {num_experts * layout.numel}")
            f.seek(offset)
            raw = arena.view(torch.uint8).numpy()
            for start in range(0, raw.size, _CHUNK_BYTES):
                f.write(memoryview(raw[start : start + _CHUNK_BYTES]))
                done += min(_CHUNK_BYTES, raw.size - start)
                if progress is not None:
                    progress(done, total)
        f.truncate(header.file_bytes)
    partial.replace(path)
    return header


def read_header(path: str | Path) -> PackedHeader:
    """The header of a store file, validated against the file's size.

    Raises:
        CheckpointError: not a store file, another format version, or a truncated file.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            magic = f.read(len(MAGIC))
            if magic != MAGIC:
                raise CheckpointError(f"{path}: not a moe-core expert store file (bad magic)")
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 2**24:
                raise CheckpointError(f"{path}: corrupt header (length {length})")
            data = json.loads(f.read(length).decode())
    except (OSError, struct.error, UnicodeDecodeError, ValueError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{path}: unreadable expert store header ({exc})") from exc
    if data.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: store format version {data.get('version')}, this "
                              f"moe-core reads version {FORMAT_VERSION}; pack the model again")
    try:
        data.pop("format", None)
        header = PackedHeader(**{**data, "moe_layers": tuple(data["moe_layers"]),
                                 "offsets": tuple(data["offsets"])})
        header.layout  # noqa: B018 - validates sizes and dtype
    except (TypeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt expert store header ({exc})") from exc
    size = path.stat().st_size
    if size != header.file_bytes:
        raise CheckpointError(f"{path}: {size} bytes, expected {header.file_bytes} (truncated "
                              f"or still being written)")
    return header


def read_packed(path: str | Path, pin: bool | None = None,
                progress: Progress | None = None) -> HostExpertStore:
    """Read a store file into (pinned, by default when CUDA is available) arenas.

    Raises:
        CheckpointError: see `read_header`.
    """
    path = Path(path)
    header = read_header(path)
    store = HostExpertStore.empty(header.layout, header.moe_layers, header.num_experts, pin)
    total = header.arena_bytes * len(header.moe_layers)
    done = 0
    with path.open("rb", buffering=0) as f:
        for layer, offset in zip(header.moe_layers, header.offsets, strict=True):
            raw = store.arena(layer).view(torch.uint8).numpy()
            f.seek(offset)
            for start in range(0, raw.size, _CHUNK_BYTES):
                view = memoryview(raw[start : start + _CHUNK_BYTES])
                while view:
                    got = f.readinto(view)
                    if not got:
                        raise CheckpointError(f"{path}: file ends inside layer {layer}'s arena")
                    view = view[got:]
                    done += got
                if progress is not None:
                    progress(done, total)
    return store
