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

FP8 experts (format version 3): the header's `dtype` is `float8_e4m3fn` and `scales` names how
the blocks carry their scales (`per_output_channel`: see `fp8.py`; each block is the FP8
`ExpertLayout`'s, weights then scales). Stores of other dtypes are still written as version 2,
and both versions are read, so files packed before FP8 existed keep working and older readers
keep reading everything but FP8 files (which they refuse with the "pack again" error).

Integrity (format version 2 and later): the header holds a CRC-32 of every expert block,
written at pack time and checked as the file is read, so a damaged or overwritten payload is
refused with the file, layer and expert named instead of generating garbage. CRC-32 because
zlib's runs at 3.8 GiB/s on one core of the 2-core EPYC dev machine (adler32 3.0, blake2b 0.8,
sha256 1.5) and releases the GIL, so each layer is checked on a second thread while the next one
is read. The check still costs up to half again a read from the page cache (docs/benchmarks.md), so
`read_packed(verify=False)` (`moe-core generate --no-verify-store`) skips it. Version 1 files (no
checksums) are refused with a "pack again" error rather than read unchecked: their payload cannot
be checked, and packing again takes no longer than reading the checkpoint once.

Why not map the file and register the mapping as pinned (`cudaHostRegister`): pinning a private
mapping takes copy-on-write copies of every page (twice the memory while the page cache holds the
file), and a shared read-only registration needs the file's pages to stay resident anyway.
Reading into freshly pinned arenas costs one sequential read at disk speed and keeps peak host
memory at the store's size.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moe_core.dtypes import parse_dtype
from moe_core.errors import CheckpointError
from moe_core.offload.fp8 import FP8
from moe_core.offload.host_store import HostExpertStore
from moe_core.offload.layout import ExpertLayout

__all__ = ["ALIGNMENT", "FORMAT_VERSION", "PackedHeader", "read_header", "read_packed",
           "write_packed"]

MAGIC = b"MOEPACK1"
FORMAT_VERSION = 3  # 2: a CRC-32 per expert block in the header; 3: FP8 blocks with scales
_READABLE_VERSIONS = (2, 3)
SCALES_PER_OUTPUT_CHANNEL = "per_output_channel"
ALIGNMENT = 4096  # page size: arenas can be read with direct I/O and mapped page-aligned
_FP8_NAME = str(FP8).removeprefix("torch.")
_CHUNK_BYTES = 256 * 2**20  # read/write granularity (one Python call per chunk)

Progress = Callable[[int, int], None]
"""`progress(done_bytes, total_bytes)`, called after every chunk."""


@dataclass(frozen=True)
class PackedHeader:
    """What a store file holds.

    Attributes:
        version: Format version: 2, or 3 for FP8 experts.
        hidden_size: D.
        intermediate_size: I.
        dtype: Storage dtype name (`bfloat16`, ...).
        num_experts: Routed experts per MoE layer.
        moe_layers: Decoder-layer indices of the stored layers.
        offsets: Byte offset of each layer's arena, in `moe_layers` order.
        source: Where the experts came from (checkpoint folder or known shape), informative.
        checksums: CRC-32 of each expert block, `[layer][expert]` in `moe_layers` order (empty
            while the file is being planned).
        scales: How FP8 blocks carry their scales (`"per_output_channel"`); `""` for other
            dtypes.
    """

    version: int
    hidden_size: int
    intermediate_size: int
    dtype: str
    num_experts: int
    moe_layers: tuple[int, ...]
    offsets: tuple[int, ...]
    source: str = ""
    checksums: tuple[tuple[int, ...], ...] = ()
    scales: str = ""

    @property
    def layout(self) -> ExpertLayout:
        """The expert block layout."""
        if self.dtype == _FP8_NAME:
            if self.scales != SCALES_PER_OUTPUT_CHANNEL:
                raise ValueError(f"FP8 experts with scales {self.scales!r}: this moe-core reads "
                                 f"{SCALES_PER_OUTPUT_CHANNEL!r}")
            return ExpertLayout(self.hidden_size, self.intermediate_size, FP8)
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
          source: str) -> tuple[PackedHeader, int]:
    """The header with its arena offsets (checksums zero until the arenas are written), and the
    length of its encoded prefix (magic + length + JSON), which the final header keeps."""
    dtype = str(layout.dtype).removeprefix("torch.")
    zeros = ((0,) * num_experts,) * len(moe_layers)
    fp8 = layout.is_fp8  # version 3 only where it is needed: older readers keep the rest
    draft = PackedHeader(FORMAT_VERSION if fp8 else 2, layout.hidden_size,
                         layout.intermediate_size, dtype, num_experts, tuple(moe_layers), (),
                         source, zeros, SCALES_PER_OUTPUT_CHANNEL if fp8 else "")
    # Room for the offsets' digits (at most 20 each, plus a separator) before the first arena.
    start = _aligned(len(_encode(draft)) + 22 * len(moe_layers))
    step = _aligned(num_experts * layout.nbytes)
    header = PackedHeader(**{**asdict(draft),
                             "offsets": tuple(start + i * step for i in range(len(moe_layers)))})
    prefix_bytes = len(_encode(header))
    assert prefix_bytes <= start
    return header, prefix_bytes


def _encode(header: PackedHeader) -> bytes:
    # Checksums as fixed-width hex, so the final header is as long as the planned one.
    fields = {**asdict(header),
              "checksums": [[f"{c:08x}" for c in layer] for layer in header.checksums]}
    body = json.dumps({"format": "moe-core expert store", **fields}).encode()
    return MAGIC + struct.pack("<Q", len(body)) + body


def _block_checksums(raw: memoryview, block_bytes: int, num_experts: int) -> tuple[int, ...]:
    """CRC-32 of each expert block of one layer's arena bytes."""
    return tuple(zlib.crc32(raw[e * block_bytes : (e + 1) * block_bytes])
                 for e in range(num_experts))


def write_packed(path: str | Path, layout: ExpertLayout, moe_layers: list[int], num_experts: int,
                 arena_of: Callable[[int], torch.Tensor], source: str = "",
                 progress: Progress | None = None) -> PackedHeader:
    """Write a store file, one layer's arena at a time, with a checksum per expert block.

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
    planned, prefix_bytes = _plan(layout, moe_layers, num_experts, source)
    partial = path.with_name(path.name + ".partial")
    total = planned.arena_bytes * len(moe_layers)
    done = 0
    checksums = []
    with partial.open("wb") as f:
        for layer, offset in zip(moe_layers, planned.offsets, strict=True):
            arena = arena_of(layer)
            if arena.numel() * arena.element_size() != planned.arena_bytes:
                raise ValueError(f"arena of layer {layer} holds {arena.numel()} elements, "
                                 f"expected {num_experts * layout.numel}")
            f.seek(offset)
            raw = arena.view(torch.uint8).numpy()
            for start in range(0, raw.size, _CHUNK_BYTES):
                f.write(raw[start : start + _CHUNK_BYTES].data)
                done += min(_CHUNK_BYTES, raw.size - start)
                if progress is not None:
                    progress(done, total)
            checksums.append(_block_checksums(raw.data, layout.nbytes, num_experts))
        header = PackedHeader(**{**asdict(planned), "checksums": tuple(checksums)})
        prefix = _encode(header)
        assert len(prefix) == prefix_bytes
        f.seek(0)
        f.write(prefix)
        f.truncate(header.file_bytes)
    partial.replace(path)
    return header


def read_header(path: str | Path) -> PackedHeader:
    """The header of a store file, validated against the file's size.

    Raises:
        CheckpointError: not a store file, another format version (1: without checksums), or a
            truncated file.
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
    version = data.get("version") if isinstance(data, dict) else None
    if version not in _READABLE_VERSIONS:
        why = " (without checksums)" if version == 1 else ""
        raise CheckpointError(f"{path}: store format version {version}{why}, this moe-core "
                              f"reads versions {' and '.join(map(str, _READABLE_VERSIONS))}; "
                              f"pack the model again "
                              f"(moe-core pack MODEL {path.name})")
    header = _parse_header(path, data)
    size = path.stat().st_size
    if size != header.file_bytes:
        raise CheckpointError(f"{path}: {size} bytes, expected {header.file_bytes} (truncated "
                              f"or still being written)")
    return header


def _parse_header(path: Path, data: dict[str, object]) -> PackedHeader:
    try:
        data.pop("format", None)
        layers = data["checksums"]
        if not isinstance(layers, list):
            raise TypeError("checksums must be a list of lists")
        checksums = tuple(tuple(int(c, 16) for c in layer) for layer in layers)
        header = PackedHeader(**{**data, "moe_layers": tuple(data["moe_layers"]),  # type: ignore[arg-type]
                                 "offsets": tuple(data["offsets"]),  # type: ignore[arg-type]
                                 "checksums": checksums})
        header.layout  # noqa: B018 - validates sizes and dtype
    except (TypeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt expert store header ({exc})") from exc
    if len(checksums) != len(header.moe_layers) or \
            any(len(layer) != header.num_experts for layer in checksums):
        raise CheckpointError(f"{path}: corrupt expert store header (checksums for "
                              f"{[len(layer) for layer in checksums]} experts, expected "
                              f"{header.num_experts} for each of {len(header.moe_layers)} layers)")
    return header


def read_packed(path: str | Path, pin: bool | None = None,
                progress: Progress | None = None, verify: bool = True) -> HostExpertStore:
    """Read a store file into (pinned, by default when CUDA is available) arenas.

    Args:
        path: The store file.
        pin: Pin the arenas; default: when CUDA is available.
        progress: Called with bytes read so far and the total.
        verify: Check every expert block against its checksum (on a second thread, one layer
            behind the reads); False skips the check.

    Raises:
        CheckpointError: see `read_header`; or an expert block whose checksum does not match
            (the message names the file, layer and expert).
    """
    path = Path(path)
    header = read_header(path)
    store = HostExpertStore.empty(header.layout, header.moe_layers, header.num_experts, pin)
    total = header.arena_bytes * len(header.moe_layers)
    done = 0
    pending: Future[None] | None = None
    with path.open("rb", buffering=0) as f, ThreadPoolExecutor(1) as checker:
        for layer, offset, expected in zip(header.moe_layers, header.offsets,
                                           header.checksums, strict=True):
            raw = store.arena(layer).view(torch.uint8).numpy()
            f.seek(offset)
            for start in range(0, raw.size, _CHUNK_BYTES):
                view = raw[start : start + _CHUNK_BYTES].data
                while view:
                    got = f.readinto(view)
                    if not got:
                        raise CheckpointError(f"{path}: file ends inside layer {layer}'s arena")
                    view = view[got:]
                    done += got
                if progress is not None:
                    progress(done, total)
            if pending is not None:
                pending.result()  # a damaged layer stops the read one layer later at most
            if verify:
                pending = checker.submit(_check_layer, path, layer, raw.data,
                                         header.layout.nbytes, expected)
        if pending is not None:
            pending.result()
    return store


def _check_layer(path: Path, layer: int, raw: memoryview, block_bytes: int,
                 expected: tuple[int, ...]) -> None:
    """Raise if an expert block of `layer` does not match its stored checksum."""
    got = _block_checksums(raw, block_bytes, len(expected))
    for e, (want, have) in enumerate(zip(expected, got, strict=True)):
        if have != want:
            raise CheckpointError(f"{path}: layer {layer}, expert {e} fails its checksum "
                                  f"(stored {want:08x}, read {have:08x}): the file is damaged; "
                                  f"pack the model again")
