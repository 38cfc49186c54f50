"""Byte sizes as people write them (`12GiB`, `500MB`, `1.5G`) and back."""

from __future__ import annotations

import re

from moe_core.errors import SettingError

__all__ = ["format_bytes", "parse_bytes"]

_UNITS = {
    "": 1, "b": 1,
    "k": 1024, "kb": 1000, "kib": 1024,
    "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1024**3, "gb": 1000**3, "gib": 1024**3,
    "t": 1024**4, "tb": 1000**4, "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str | int) -> int:
    """`"12GiB"` -> 12884901888. Bare `K`/`M`/`G`/`T` are binary (1024-based), `KB`/`MB`/`GB`/`TB`
    decimal, `KiB`/`MiB`/`GiB`/`TiB` binary.

    Raises:
        SettingError: not a size (a `ValueError`).
    """
    if isinstance(text, int):
        if text < 0:
            raise SettingError(f"size must be non-negative, got {text}")
        return text
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise SettingError(f"not a size: {text!r} (examples: 12GiB, 500MB, 1.5G)")
    return int(float(match.group(1)) * _UNITS[unit])


def format_bytes(n: float) -> str:
    """`12884901888` -> `"12.00 GiB"` (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
