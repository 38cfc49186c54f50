"""The one binary container behind trace files and collection files.

Layout (all integers little-endian):

    magic      8 bytes  b"MOEINFTR"
    version    uint32   FORMAT_VERSION
    header_len uint32   length of the JSON header
    header     JSON     {"kind", "meta", "arrays": [{"name", "dtype", "shape", "offset"}],
                         "payload_bytes", "payload_crc32", "raw_bytes"}
    payload    bytes    zlib stream of the arrays, C order, back to back (offsets relative to
                        the decompressed payload); length and CRC-32 are of the stored bytes

A reader checks, in order: the magic, the version, the header, the kind, the payload length and
its CRC-32, then each array's extent; any failure is a `TraceFileError` naming the file and what
is wrong, never a numpy or JSON traceback. A plain JSON header keeps the file inspectable
(`head -c 4096 traces.bin`) and lets later versions add fields.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np

from moe_infinity.errors import TraceFileError

__all__ = ["FORMAT_VERSION", "MAGIC", "read_container", "write_container"]

MAGIC = b"MOEINFTR"
FORMAT_VERSION = 2
_PREFIX = struct.Struct("<8sII")
_DTYPES = {"int16", "int32", "int64", "uint8", "float16", "float32", "float64"}


def write_container(path: str | Path, kind: str, meta: dict[str, object],
                    arrays: dict[str, np.ndarray]) -> Path:
    """Write `arrays` and the JSON-ready `meta` as one container of `kind` at `path`."""
    entries, blobs, offset = [], [], 0
    for name, array in arrays.items():
        data = np.ascontiguousarray(array)
        if data.dtype.name not in _DTYPES:
            raise ValueError(f"array {name!r}: dtype {data.dtype} is not storable")
        raw = data.astype(data.dtype.newbyteorder("<"), copy=False).tobytes()
        entries.append({"name": name, "dtype": data.dtype.name, "shape": list(data.shape),
                        "offset": offset})
        blobs.append(raw)
        offset += len(raw)
    raw = b"".join(blobs)
    payload = zlib.compress(raw, 6)
    header = json.dumps({"kind": kind, "meta": meta, "arrays": entries,
                         "payload_bytes": len(payload), "raw_bytes": len(raw),
                         "payload_crc32": zlib.crc32(payload) & 0xFFFFFFFF}).encode()
    path = Path(path)
    path.write_bytes(_PREFIX.pack(MAGIC, FORMAT_VERSION, len(header)) + header + payload)
    return path


def read_container(path: str | Path, kind: str) -> tuple[dict[str, object], dict[str, np.ndarray]]:
    """`(meta, arrays)` of the container of `kind` at `path`.

    Raises:
        TraceFileError: missing file, not a container, another version, another kind, corrupt.
    """
    path = Path(path)
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise TraceFileError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if len(blob) < _PREFIX.size or blob[:8] != MAGIC:
        raise TraceFileError(f"{path}: not a moe-infinity {kind} file (bad magic bytes)")
    _, version, header_len = _PREFIX.unpack_from(blob)
    if version != FORMAT_VERSION:
        raise TraceFileError(f"{path}: format version {version}, this moe-infinity reads "
                             f"version {FORMAT_VERSION}")
    header = _header(path, blob[_PREFIX.size : _PREFIX.size + header_len])
    if header.get("kind") != kind:
        raise TraceFileError(f"{path}: holds {header.get('kind')!r}, expected a {kind} file")
    payload = blob[_PREFIX.size + header_len :]
    if len(payload) != header.get("payload_bytes"):
        raise TraceFileError(f"{path}: corrupt (payload is {len(payload)} bytes, the header "
                             f"says {header.get('payload_bytes')}; truncated?)")
    if zlib.crc32(payload) & 0xFFFFFFFF != header.get("payload_crc32"):
        raise TraceFileError(f"{path}: corrupt (payload checksum mismatch)")
    meta = header.get("meta")
    if not isinstance(meta, dict):
        raise TraceFileError(f"{path}: corrupt header (no meta)")
    try:
        raw = zlib.decompress(payload)
    except zlib.error:
        raise TraceFileError(f"{path}: corrupt (payload does not decompress)") from None
    if len(raw) != header.get("raw_bytes"):
        raise TraceFileError(f"{path}: corrupt (decompressed payload has the wrong length)")
    return meta, _arrays(path, header, raw)


def _header(path: Path, raw: bytes) -> dict[str, object]:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise TraceFileError(f"{path}: corrupt header (not JSON)") from None
    if not isinstance(header, dict):
        raise TraceFileError(f"{path}: corrupt header (not an object)")
    return header


def _arrays(path: Path, header: dict[str, object], payload: bytes) -> dict[str, np.ndarray]:
    entries = header.get("arrays")
    if not isinstance(entries, list):
        raise TraceFileError(f"{path}: corrupt header (no array table)")
    out: dict[str, np.ndarray] = {}
    for entry in entries:
        try:
            name, dtype = str(entry["name"]), np.dtype(str(entry["dtype"])).newbyteorder("<")
            shape, offset = tuple(int(n) for n in entry["shape"]), int(entry["offset"])
        except (KeyError, TypeError, ValueError):
            raise TraceFileError(f"{path}: corrupt array table entry {entry!r}") from None
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if dtype.name not in _DTYPES or min(shape, default=0) < 0 or offset < 0 \
                or offset + nbytes > len(payload):
            raise TraceFileError(f"{path}: corrupt array {name!r} (extent outside the payload)")
        out[name] = np.frombuffer(payload, dtype=dtype, count=nbytes // dtype.itemsize,
                                  offset=offset).reshape(shape).astype(dtype.newbyteorder("="))
    return out
