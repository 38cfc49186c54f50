"""Hit rate versus cache size, one line per policy, drawn into an RGB array (no plotting library).

Dimension key: H image rows, W image columns.

The plot: x from 0 to the largest cache fraction, y (hit rate) from 0 to 1, light grid lines at
every 10% of hit rate and at each cache fraction, tick labels in a built-in 3x5 pixel font
(digits, capitals and a few signs; other characters are left out), one coloured polyline with
square markers per series, and a legend at the right: a colour swatch and the series' label in
capitals, top to bottom in series order.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["PALETTE", "PlotLayout", "Series", "line_plot"]

# Okabe & Ito's colour-blind-safe palette, black first.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0), (230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178),
    (213, 94, 0), (204, 121, 167), (128, 128, 128))
_GRID = (225, 225, 225)
_AXIS = (60, 60, 60)
# A 3x5 pixel font: each glyph is five rows of three bits.
_FONT = {
    "0": ("111", "101", "101", "101", "111"), "1": ("010", "110", "010", "010", "111"),
    "2": ("111", "001", "111", "100", "111"), "3": ("111", "001", "111", "001", "111"),
    "4": ("101", "101", "111", "001", "001"), "5": ("111", "100", "111", "001", "111"),
    "6": ("111", "100", "111", "101", "111"), "7": ("111", "001", "010", "010", "010"),
    "8": ("111", "101", "111", "101", "111"), "9": ("111", "101", "111", "001", "111"),
    ".": ("000", "000", "000", "000", "010"), "%": ("101", "001", "010", "100", "101"),
    "+": ("000", "010", "111", "010", "000"), "-": ("000", "000", "111", "000", "000"),
    "A": ("010", "101", "111", "101", "101"), "B": ("110", "101", "110", "101", "110"),
    "C": ("011", "100", "100", "100", "011"), "D": ("110", "101", "101", "101", "110"),
    "E": ("111", "100", "110", "100", "111"), "F": ("111", "100", "110", "100", "100"),
    "G": ("011", "100", "101", "101", "011"), "H": ("101", "101", "111", "101", "101"),
    "I": ("111", "010", "010", "010", "111"), "K": ("101", "101", "110", "101", "101"),
    "L": ("100", "100", "100", "100", "111"), "M": ("101", "111", "111", "101", "101"),
    "N": ("110", "101", "101", "101", "101"), "O": ("010", "101", "101", "101", "010"),
    "P": ("110", "101", "110", "100", "100"), "R": ("110", "101", "110", "101", "101"),
    "S": ("011", "100", "010", "001", "110"), "T": ("111", "010", "010", "010", "010"),
    "U": ("101", "101", "101", "101", "111"), "V": ("101", "101", "101", "101", "010"),
    "W": ("101", "101", "111", "111", "101"), "Y": ("101", "101", "010", "010", "010"),
}


@dataclass(frozen=True)
class Series:
    """One line: its points `(x, y)` in data units, and its colour.

    Attributes:
        label: Its name, drawn in the legend.
        points: `(cache fraction, hit rate)` pairs; drawn in x order.
        colour: RGB.
    """

    label: str
    points: tuple[tuple[float, float], ...]
    colour: tuple[int, int, int]


@dataclass(frozen=True)
class PlotLayout:
    """Pixel sizes of the plot.

    Attributes:
        width_px, height_px: The image.
        margin_px: Space around the plot area (tick labels sit in it).
        legend_px: Width of the legend column at the right.
        scale: Pixel size of one font pixel.
    """

    width_px: int = 960
    height_px: int = 440
    margin_px: int = 44
    legend_px: int = 280
    scale: int = 2

    def __post_init__(self) -> None:
        for name in ("width_px", "height_px", "margin_px", "scale"):
            if getattr(self, name) <= 0:
                raise ValueError(f"PlotLayout.{name} must be positive")
        if self.legend_px < 0 or self.width_px <= 2 * self.margin_px + self.legend_px \
                or self.height_px <= 2 * self.margin_px:
            raise ValueError("PlotLayout leaves no room for the plot area")


class _Canvas:
    def __init__(self, layout: PlotLayout, x_max: float) -> None:
        self.image = np.full((layout.height_px, layout.width_px, 3), 255, dtype=np.uint8)
        self.left = layout.margin_px
        self.right = layout.width_px - layout.margin_px - layout.legend_px
        self.top = layout.margin_px // 2
        self.bottom = layout.height_px - layout.margin_px
        self.x_max = x_max
        self.scale = layout.scale

    def px(self, x: float, y: float) -> tuple[float, float]:
        """Image `(column, row)` of data point `(x, y)`."""
        col = self.left + x / self.x_max * (self.right - self.left)
        row = self.bottom - y * (self.bottom - self.top)
        return col, row

    def rect(self, c0: int, r0: int, c1: int, r1: int, colour: tuple[int, int, int]) -> None:
        h, w = self.image.shape[:2]
        self.image[max(r0, 0) : min(r1, h), max(c0, 0) : min(c1, w)] = colour

    def line(self, a: tuple[float, float], b: tuple[float, float],
             colour: tuple[int, int, int], width: int = 2) -> None:
        steps = int(max(abs(b[0] - a[0]), abs(b[1] - a[1])) * 2) + 1
        for t in np.linspace(0.0, 1.0, steps):
            c, r = round(a[0] + t * (b[0] - a[0])), round(a[1] + t * (b[1] - a[1]))
            self.rect(c - width // 2, r - width // 2, c - width // 2 + width,
                      r - width // 2 + width, colour)

    def text(self, text: str, col: int, row: int) -> None:
        """Draw `text` with its top-left corner at (col, row); unknown characters are skipped."""
        s = self.scale
        for i, char in enumerate(text):
            glyph = _FONT.get(char.upper())
            if glyph is None:
                continue
            for gr, bits in enumerate(glyph):
                for gc, bit in enumerate(bits):
                    if bit == "1":
                        c, r = col + (i * 4 + gc) * s, row + gr * s
                        self.rect(c, r, c + s, r + s, _AXIS)

    def text_width(self, text: str) -> int:
        return (len(text) * 4 - 1) * self.scale


def _label(value: float) -> str:
    return f"{value * 100:.0f}%" if abs(value * 100 - round(value * 100)) < 1e-9 \
        else f"{value * 100:.1f}%"


def line_plot(series: Sequence[Series], layout: PlotLayout = PlotLayout()) -> np.ndarray:
    """The plot image `[H, W, 3]` uint8 (see the module docstring).

    Raises:
        ValueError: no series, a series without points, or a point outside x > 0, 0 <= y <= 1.
    """
    if not series or any(not s.points for s in series):
        raise ValueError("line_plot needs at least one series, each with points")
    xs = sorted({x for s in series for x, _ in s.points})
    if xs[0] <= 0 or any(not 0.0 <= y <= 1.0 for s in series for _, y in s.points):
        raise ValueError("points must have x > 0 and 0 <= y <= 1")
    canvas = _Canvas(layout, xs[-1])
    for tick in np.linspace(0.0, 1.0, 11):
        _, row = canvas.px(0.0, float(tick))
        canvas.rect(canvas.left, round(row), canvas.right + 1, round(row) + 1, _GRID)
        if round(tick * 10) % 2 == 0:
            label = _label(float(tick))
            canvas.text(label, canvas.left - canvas.text_width(label) - 6,
                        round(row) - 2 * canvas.scale)
    for x in xs:
        col, _ = canvas.px(x, 0.0)
        canvas.rect(round(col), canvas.top, round(col) + 1, canvas.bottom, _GRID)
        label = _label(x)
        canvas.text(label, round(col) - canvas.text_width(label) // 2, canvas.bottom + 8)
    canvas.rect(canvas.left, canvas.top, canvas.left + 1, canvas.bottom + 1, _AXIS)
    canvas.rect(canvas.left, canvas.bottom, canvas.right + 1, canvas.bottom + 1, _AXIS)
    for s in series:
        pts = [canvas.px(x, y) for x, y in sorted(s.points)]
        for a, b in itertools.pairwise(pts):
            canvas.line(a, b, s.colour)
        for c, r in pts:
            canvas.rect(round(c) - 3, round(r) - 3, round(c) + 4, round(r) + 4, s.colour)
    for i, s in enumerate(series):
        row = canvas.top + 4 + i * 18
        canvas.rect(canvas.right + 16, row, canvas.right + 16 + 28, row + 10, s.colour)
        canvas.text(s.label, canvas.right + 52, row)
    return canvas.image
