"""A PNG heat map of expert routing, written with `zlib` and `struct` alone (matplotlib is not a
dependency of moe-core).

Dimension key: H image rows, W image columns, L MoE layers, E routed experts, P panels.

The encoder writes the smallest valid PNG (W3C PNG specification, 2nd edition, sections 5 and
11): the signature, an `IHDR` chunk (8-bit truecolour RGB, no interlace), one `IDAT` chunk holding
the zlib stream of all scanlines (each prefixed by filter type 0, "None"), and `IEND`. Every chunk
is its big-endian length, its type, its data and the CRC-32 of type and data.

The heat map lays out one panel per domain, side by side on white: rows are MoE layers, columns
are experts, colour is the share of that layer's top-k assignments going to the expert, on one
scale shared by every panel. A colour bar under the panels runs from 0 (left) to the scale's
maximum (right); the numbers belong in the caption, since the image carries no text.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["PNG_SIGNATURE", "HeatmapLayout", "colour_ramp", "encode_png", "routing_heatmap",
           "write_png"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
"""The eight bytes every PNG file starts with."""

# Matplotlib's viridis at nine evenly spaced points: perceptually uniform, readable in grey and
# by the colour-blind; linear interpolation between these is indistinguishable at heat-map scale.
_VIRIDIS = np.array([
    [68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
    [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37],
], dtype=np.float64)  # [9, 3]
_WHITE = 255


@dataclass(frozen=True)
class HeatmapLayout:
    """Pixel sizes of the routing heat map.

    Attributes:
        cell_width_px: Width of one expert's cell.
        cell_height_px: Height of one layer's row.
        gap_px: White space between panels, around the image, and above the colour bar.
        bar_height_px: Height of the colour bar under the panels (0: no bar).
    """

    cell_width_px: int = 10
    cell_height_px: int = 20
    gap_px: int = 12
    bar_height_px: int = 10

    def __post_init__(self) -> None:
        for name in ("cell_width_px", "cell_height_px", "gap_px"):
            if getattr(self, name) <= 0:
                raise ValueError(f"HeatmapLayout.{name} must be positive")
        if self.bar_height_px < 0:
            raise ValueError("HeatmapLayout.bar_height_px must not be negative")

    def image_size(self, num_panels: int, num_layers: int, num_experts: int) -> tuple[int, int]:
        """`(height_px, width_px)` of a heat map with this many panels, rows and columns."""
        width = self.gap_px * (num_panels + 1) + num_panels * num_experts * self.cell_width_px
        height = 2 * self.gap_px + num_layers * self.cell_height_px
        if self.bar_height_px:
            height += self.bar_height_px + self.gap_px
        return height, width


def colour_ramp(values: np.ndarray) -> np.ndarray:
    """RGB colours `[..., 3]` uint8 of `values` in [0, 1] (clipped) on the viridis ramp."""
    x = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0) * (len(_VIRIDIS) - 1)
    low = np.minimum(np.floor(x).astype(np.int64), len(_VIRIDIS) - 2)
    frac = (x - low)[..., None]  # [..., 1]
    rgb = _VIRIDIS[low] * (1 - frac) + _VIRIDIS[low + 1] * frac  # [..., 3]
    return np.rint(rgb).astype(np.uint8)


def routing_heatmap(shares: Sequence[np.ndarray], layout: HeatmapLayout = HeatmapLayout(),
                    vmax: float | None = None) -> np.ndarray:
    """The heat map image `[H, W, 3]` uint8 of one `[L, E]` share matrix per panel.

    Args:
        shares: Per panel (domain), each layer's share of assignments per expert `[L, E]`.
        layout: Pixel sizes.
        vmax: The share drawn in the ramp's top colour (default: the largest share shown).

    Raises:
        ValueError: no panels, panels of different shapes, or a non-positive `vmax`.
    """
    if not shares:
        raise ValueError("routing_heatmap needs at least one panel")
    shape = np.shape(shares[0])
    if len(shape) != 2 or any(np.shape(s) != shape for s in shares):
        raise ValueError(f"every panel must be one [layers, experts] matrix of the same shape, "
                         f"got {[np.shape(s) for s in shares]}")
    num_layers, num_experts = shape
    top = float(max(np.max(s) for s in shares)) if vmax is None else float(vmax)
    if not top > 0:
        raise ValueError(f"vmax must be positive, got {top}")
    height, width = layout.image_size(len(shares), num_layers, num_experts)
    image = np.full((height, width, 3), _WHITE, dtype=np.uint8)
    g, cw, ch = layout.gap_px, layout.cell_width_px, layout.cell_height_px
    panel_width = num_experts * cw
    for p, panel in enumerate(shares):
        cells = colour_ramp(np.asarray(panel, dtype=np.float64) / top)  # [L, E, 3]
        pixels = np.repeat(np.repeat(cells, ch, axis=0), cw, axis=1)  # [L*ch, E*cw, 3]
        x0 = g + p * (panel_width + g)
        image[g : g + num_layers * ch, x0 : x0 + panel_width] = pixels
    if layout.bar_height_px:
        y0 = 2 * g + num_layers * ch
        ramp = colour_ramp(np.linspace(0.0, 1.0, width - 2 * g))  # [W - 2g, 3]
        image[y0 : y0 + layout.bar_height_px, g : width - g] = ramp[None]
    return image


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
