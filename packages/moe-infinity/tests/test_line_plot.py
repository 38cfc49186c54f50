"""The dependency-free plot: a valid PNG, lines where the data says, errors for bad input."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from moe_infinity.line_plot import PALETTE, PlotLayout, Series, line_plot
from moe_infinity.png import PNG_SIGNATURE, encode_png


def _decode(blob: bytes) -> np.ndarray:
    """Read back our own PNG (one IDAT, filter type 0)."""
    assert blob.startswith(PNG_SIGNATURE)
    pos, chunks = len(PNG_SIGNATURE), {}
    while pos < len(blob):
        (length,) = struct.unpack(">I", blob[pos : pos + 4])
        kind, data = blob[pos + 4 : pos + 8], blob[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", blob[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + data) & 0xFFFFFFFF
        chunks[kind] = data
        pos += 12 + length
    width, height = struct.unpack(">II", chunks[b"IHDR"][:8])
    rows = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(height, -1)
    assert not rows[:, 0].any()
    return rows[:, 1:].reshape(height, width, 3)


def test_png_round_trip() -> None:
    image = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    np.testing.assert_array_equal(_decode(encode_png(image)), image)
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((2, 2), np.uint8))


def test_lines_are_drawn_in_their_colours() -> None:
    series = [Series("a", ((0.1, 0.2), (0.5, 0.9)), PALETTE[1]),
              Series("b", ((0.1, 0.6), (0.25, 0.6), (0.5, 0.7)), PALETTE[5])]
    layout = PlotLayout()
    image = line_plot(series, layout)
    assert image.shape == (layout.height_px, layout.width_px, 3)
    for colour in (PALETTE[1], PALETTE[5]):
        assert (image == colour).all(axis=2).sum() > 100
    # The point (0.5, 0.9) of series a: rightmost x, 90% of the way up.
    plot_right = layout.width_px - layout.margin_px - layout.legend_px
    top, bottom = layout.margin_px // 2, layout.height_px - layout.margin_px
    row = round(bottom - 0.9 * (bottom - top))
    assert (image[row, plot_right] == PALETTE[1]).all()
    legend = image[:, plot_right + 52 :]
    assert (legend == (60, 60, 60)).all(axis=2).sum() > 50  # the labels' letters


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="at least one"):
        line_plot([])
    with pytest.raises(ValueError, match="0 <= y <= 1"):
        line_plot([Series("a", ((0.1, 1.5),), PALETTE[0])])
    with pytest.raises(ValueError, match="no room"):
        PlotLayout(width_px=100, margin_px=40)
