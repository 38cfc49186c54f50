"""Trace files (`traces.bin`): a `TraceSet` in the versioned container.

Per-step counts and lookahead scores are stored sparse (the non-zero entries of each `[S, L, E]`
array and their flat positions): a decode step of a top-k model touches k of E experts per layer,
so a dense array would be mostly zeros on large models.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from moe_infinity.container import read_container, write_container
from moe_infinity.errors import TraceFileError
from moe_infinity.model_shape import ModelShape
from moe_infinity.trace import RequestTrace, TraceSet

__all__ = ["load_traces", "save_traces"]

_KIND = "traces"


def save_traces(traces: TraceSet, path: str | Path) -> Path:
    """Write `traces` to `path` (see the module docstring); returns the path."""
    items = list(traces)
    steps = np.array([0] + [t.num_steps for t in items], dtype=np.int64).cumsum()
    counts = _concat([t.step_counts for t in items], traces.shape)
    looks = _concat([t.lookahead for t in items], traces.shape)
    count_at = np.flatnonzero(counts)
    look_at = np.flatnonzero(looks)
    meta: dict[str, object] = {"shape": traces.shape.to_dict(), "settings": traces.settings,
            "requests": [{"id": t.request_id, "domain": t.domain} for t in items]}
    arrays = {
        "step_offsets": steps,
        "step_tokens": np.concatenate([t.step_tokens for t in items]).astype(np.int32)
        if items else np.zeros(0, np.int32),
        "count_index": count_at.astype(np.int64),
        "count_value": counts.reshape(-1)[count_at].astype(np.int32),
        "lookahead_index": look_at.astype(np.int64),
        "lookahead_value": looks.reshape(-1)[look_at].astype(np.float32),
    }
    return write_container(path, _KIND, meta, arrays)


def load_traces(path: str | Path) -> TraceSet:
    """The `TraceSet` stored at `path`.

    Raises:
        TraceFileError: the file is missing, corrupt, of another format version, or inconsistent.
    """
    meta, arrays = read_container(path, _KIND)
    try:
        shape = ModelShape.from_dict(meta["shape"])  # type: ignore[arg-type]
        requests = meta["requests"]
        settings = meta.get("settings", {})
        offsets = arrays["step_offsets"]
        dims = (int(offsets[-1]), shape.num_moe_layers, shape.num_experts)
        counts = _dense(arrays["count_index"], arrays["count_value"], dims, np.int32)
        looks = _dense(arrays["lookahead_index"], arrays["lookahead_value"], dims, np.float32)
        tokens = arrays["step_tokens"]
        if not isinstance(requests, list) or len(offsets) != len(requests) + 1 \
                or len(tokens) != dims[0] or not isinstance(settings, dict):
            raise ValueError("request table and step arrays disagree")
        traces = [RequestTrace(str(r["id"]), None if r.get("domain") is None else str(r["domain"]),
                               counts[a:b], looks[a:b], tokens[a:b].astype(np.int64))
                  for r, a, b in zip(requests, offsets[:-1], offsets[1:], strict=True)]
        return TraceSet(shape, traces, settings)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise TraceFileError(f"{path}: inconsistent trace file ({exc})") from None


def _concat(parts: list[np.ndarray], shape: ModelShape) -> np.ndarray:
    if not parts:
        return np.zeros((0, shape.num_moe_layers, shape.num_experts))
    return np.concatenate(parts)


def _dense(index: np.ndarray, value: np.ndarray, dims: tuple[int, int, int],
           dtype: type[np.generic]) -> np.ndarray:
    """`[S, L, E]` from flat positions and values; raises `ValueError` if they do not fit."""
    size = dims[0] * dims[1] * dims[2]
    if index.shape != value.shape or (index.size and (index.min() < 0 or index.max() >= size)):
        raise ValueError("sparse entries outside the [S, L, E] array")
    out = np.zeros(size, dtype=dtype)
    out[index] = value
    return out.reshape(dims)
