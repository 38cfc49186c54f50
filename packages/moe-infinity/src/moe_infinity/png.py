"""A minimal PNG encoder with `zlib` and `struct` alone (matplotlib is not a dependency).

The smallest valid PNG (W3C PNG specification, 2nd edition, sections 5 and 11): the signature,
an `IHDR` chunk (8-bit truecolour RGB, no interlace), one `IDAT` chunk holding the zlib stream of
all scanlines (each prefixed by filter type 0, "None"), and `IEND`. Every chunk is its
big-endian length, its type, its data and the CRC-32 of type and data.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

__all__ = ["PNG_SIGNATURE", "encode_png", "write_png"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def encode_png(rgb: np.ndarray) -> bytes:
    """The PNG file bytes of an RGB image `[H, W, 3]` uint8.

    Raises:
        ValueError: not a non-empty `[H, W, 3]` uint8 array.
    """
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or 0 in rgb.shape:
        raise ValueError(f"need a non-empty [H, W, 3] uint8 image, got {rgb.dtype} {rgb.shape}")
    height, width = rgb.shape[:2]
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    rows = np.concatenate([np.zeros((height, 1), dtype=np.uint8),  # filter type 0 per row
                           rgb.reshape(height, width * 3)], axis=1)  # [H, 1 + 3W]
    return (PNG_SIGNATURE + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 9)) + _chunk(b"IEND", b""))


def write_png(path: str | Path, rgb: np.ndarray) -> Path:
    """Write the RGB image `[H, W, 3]` uint8 as a PNG file at `path`; returns the path."""
    path = Path(path)
    path.write_bytes(encode_png(rgb))
    return path
