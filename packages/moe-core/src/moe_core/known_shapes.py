"""Shapes of well-known MoE checkpoints (their `config.json` only), shipped for offline planning
and dummy-weight benchmarks: `moe-core inspect qwen3-30b-a3b` works without a download."""

from __future__ import annotations

from pathlib import Path

__all__ = ["known_shape_path", "known_shapes"]

_SHAPES = Path(__file__).parent / "shapes"


def known_shapes() -> tuple[str, ...]:
    """Names of the shipped shapes (`"mixtral-8x7b"`, `"qwen3-30b-a3b"`, ...)."""
    return tuple(sorted(p.name for p in _SHAPES.iterdir() if (p / "config.json").is_file()))


def known_shape_path(name: str) -> Path | None:
    """The folder holding the shape's `config.json`, or None if `name` is not a shipped shape."""
    folder = _SHAPES / name.lower()
    return folder if name.lower() in known_shapes() else None
