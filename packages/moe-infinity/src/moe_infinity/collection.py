"""The trace collection: a bounded set of past requests' EAMs, matched against a running request.

Dimension key: N stored traces, L MoE layers, E routed experts.

After MoE-Infinity (Xue et al., arXiv:2401.14361 §4.2): the running request's partial EAM is
compared with every stored EAM by cosine similarity, and the best matches predict the experts it
will need. Two choices of ours, both for partial matching:

- Each layer's row is normalised to unit length before comparing, so every layer weighs the
  same (a prompt of 500 tokens and one of 20 compare by *which* experts they use, not by how
  many tokens), and the similarity is the mean per-layer cosine over the layers the query has
  observed so far. Layers the query has not reached yet neither help nor hurt.
- When the collection is full, a new EAM replaces the stored one most similar to it, so the
  collection keeps distinct routing patterns instead of the most recent ones (the paper's rule).

Matching is one `[N, L*E] x [L*E]` product: 1,000 traces of a 6 x 16 model take a few
microseconds, of Qwen3-30B-A3B (48 x 128) well under a millisecond (benchmarks/
moe_infinity_matching.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moe_infinity.container import read_container, write_container
from moe_infinity.errors import TraceFileError
from moe_infinity.model_shape import ModelShape

__all__ = ["Match", "TraceCollection", "layer_unit"]

_KIND = "collection"


def layer_unit(eam: np.ndarray) -> np.ndarray:
    """`eam` `[..., L, E]` with each layer's row scaled to unit length (zero rows stay zero)."""
    eam = np.asarray(eam, dtype=np.float32)
    norms = np.linalg.norm(eam, axis=-1, keepdims=True)  # [..., L, 1]
    return np.divide(eam, norms, out=np.zeros_like(eam), where=norms > 0)


@dataclass(frozen=True)
class Match:
    """The best stored traces for a query, best first.

    Attributes:
        indices: `[M]` slots in the collection.
        similarities: `[M]` their similarity to the query, in [0, 1] for count EAMs.
    """

    indices: np.ndarray
    similarities: np.ndarray


class TraceCollection:
    """Up to `capacity` EAMs of past requests of one model.

    Attributes:
        shape: The model the EAMs belong to.
        capacity: Most EAMs held.
    """

    def __init__(self, shape: ModelShape, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"TraceCollection capacity must be positive, got {capacity}")
        self.shape = shape
        self.capacity = capacity
        dims = (capacity, shape.num_moe_layers, shape.num_experts)
        self._counts = np.zeros(dims, dtype=np.float32)  # [N, L, E]
        self._unit = np.zeros((capacity, dims[1] * dims[2]), dtype=np.float32)  # [N, L*E]
        self._dist = np.zeros(dims, dtype=np.float32)  # [N, L, E], each row sums to 1 (or 0)
        self._size = 0

    def __len__(self) -> int:
        return self._size

    @property
    def counts(self) -> np.ndarray:
        """`[n, L, E]` the stored EAMs (a read-only view)."""
        view = self._counts[: self._size]
        view.flags.writeable = False
        return view

    def add(self, eam: np.ndarray) -> int:
        """Store `eam` `[L, E]`; when full, it replaces the most similar stored EAM.

        Returns the slot it went to. Raises `ValueError` for a wrong shape, negative counts or an
        all-zero EAM (nothing to match on).
        """
        eam = self._check(eam)
        if not eam.any():
            raise ValueError("an all-zero EAM cannot be stored")
        if self._size < self.capacity:
            slot = self._size
            self._size += 1
        else:
            slot = int(self.match(eam, top=1).indices[0])
        self._counts[slot] = eam
        unit = layer_unit(eam)
        self._unit[slot] = unit.reshape(-1)
        sums = eam.sum(axis=-1, keepdims=True)
        self._dist[slot] = np.divide(eam, sums, out=np.zeros_like(eam), where=sums > 0)
        return slot

    def similarities(self, partial: np.ndarray) -> np.ndarray:
        """`[n]` similarity of every stored EAM to `partial` `[L, E]`: the mean per-layer cosine
        over the layers where `partial` has counts (0 for an all-zero query)."""
        query = layer_unit(self._check(partial))  # [L, E]
        observed = int((query.any(axis=-1)).sum())
        if observed == 0 or self._size == 0:
            return np.zeros(self._size, dtype=np.float32)
        return self._unit[: self._size] @ query.reshape(-1) / observed  # [n]

    def match(self, partial: np.ndarray, top: int = 1) -> Match:
        """The `top` stored EAMs most similar to `partial` `[L, E]`, best first."""
        if top <= 0:
            raise ValueError(f"top must be positive, got {top}")
        sims = self.similarities(partial)
        best = np.argpartition(-sims, top - 1)[:top] if len(sims) > top else np.arange(len(sims))
        best = best[np.argsort(-sims[best], kind="stable")]
        return Match(best, sims[best])

    def distributions(self, indices: np.ndarray) -> np.ndarray:
        """`[M, L, E]` each chosen EAM as per-layer shares (rows sum to 1)."""
        return self._dist[np.asarray(indices, dtype=np.int64)]

    def mean_distribution(self) -> np.ndarray:
        """`[L, E]` the average per-layer shares of all stored EAMs (a prior before any match)."""
        if self._size == 0:
            return np.zeros(self._dist.shape[1:], dtype=np.float32)
        return self._dist[: self._size].mean(axis=0)

    def _check(self, eam: np.ndarray) -> np.ndarray:
        eam = np.asarray(eam, dtype=np.float32)
        want = (self.shape.num_moe_layers, self.shape.num_experts)
        if eam.shape != want:
            raise ValueError(f"EAM must be {list(want)} for {self.shape.model_name}, "
                             f"got {list(eam.shape)}")
        if (eam < 0).any():
            raise ValueError("EAM counts must not be negative")
        return eam

    # Files ----------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the collection (its model shape, capacity and EAMs) to `path`."""
        return write_container(path, _KIND, {"shape": self.shape.to_dict(),
                                             "capacity": self.capacity},
                               {"counts": self._counts[: self._size]})

    @classmethod
    def load(cls, path: str | Path, expect: ModelShape | None = None) -> TraceCollection:
        """The collection stored at `path`.

        Args:
            path: A file written by `save`.
            expect: The model it must belong to (layers, experts and top-k must agree).

        Raises:
            TraceFileError: the file is missing, corrupt, of another version, or for another
                model.
        """
        meta, arrays = read_container(path, _KIND)
        try:
            shape = ModelShape.from_dict(meta["shape"])  # type: ignore[arg-type]
            capacity = meta["capacity"]
            counts = arrays["counts"]
            if not isinstance(capacity, int) or counts.ndim != 3 or len(counts) > capacity:
                raise ValueError("capacity and stored EAMs disagree")
            collection = cls(shape, capacity)
            for eam in counts:
                collection.add(eam)
        except (KeyError, TypeError, ValueError) as exc:
            raise TraceFileError(f"{path}: inconsistent collection file ({exc})") from None
        if expect is not None and _key(expect) != _key(shape):
            raise TraceFileError(f"{path}: a collection for {shape.describe()}, not for "
                                 f"{expect.describe()}")
        return collection


def _key(shape: ModelShape) -> tuple[int, int, int]:
    return shape.num_moe_layers, shape.num_experts, shape.top_k
