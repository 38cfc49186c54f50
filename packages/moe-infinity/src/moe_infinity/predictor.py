"""The expert predictor: how much each expert of each layer will be needed, seen from where a
request is now.

Dimension key: L MoE layers, E routed experts, M matched traces.

Three sources, each a per-layer distribution over experts (rows sum to 1):

- `trace`: the collection's best matches for the request's EAM so far (their per-layer shares,
  weighted by similarity), re-matched after every prefill layer and after every decode step;
  before anything is observed, the collection's average.
- `lookahead`: layer l+1's router applied to layer l's hidden state (recorded by the tracer);
  it exists for the next layer of the same step only.
- `own`: the request's own routing so far: its decode counts with an exponential recency weight
  (`own_decay` per step), or, before the first decode step, its prefill counts.

They are mixed with weights (`PredictorConfig.weights`; `calibrate_weights` sets them to each
source's measured recall), and each layer's mix is scaled by `layer_decay ** (d - 1)`, d the
number of layers until that layer runs again (the layer-distance decay of MoE-Infinity's
prefetch priority, arXiv:2401.14361 §5): the nearer layer wins a tie, and a confident far
prediction still beats a weak near one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moe_infinity.collection import TraceCollection

__all__ = ["SOURCES", "PredictorConfig", "RequestPredictor", "layer_distance", "row_shares"]

SOURCES: tuple[str, ...] = ("trace", "lookahead", "own")


def row_shares(x: np.ndarray) -> np.ndarray:
    """`x` `[..., E]` with each row scaled to sum to 1 (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    sums = x.sum(axis=-1, keepdims=True)
    return np.divide(x, sums, out=np.zeros_like(x), where=sums > 0)


def layer_distance(num_layers: int, current: int) -> np.ndarray:
    """`[L]` layers until each layer runs next, seen while layer `current` runs: 1 for the next
    layer, ..., `L` for `current` itself (it runs again at the next step)."""
    d = (np.arange(num_layers) - current) % num_layers
    d[current] = num_layers
    return d


@dataclass(frozen=True, kw_only=True)
class PredictorConfig:
    """How the predictor scores experts.

    Attributes:
        sources: Which sources to use (a subset of `SOURCES`).
        weights: Mixing weight per source, in `SOURCES` order.
        num_matches: Stored traces averaged per match.
        layer_decay: Weight per layer of distance, in (0, 1].
        own_decay: Recency weight per decode step of the request's own counts, in (0, 1].
    """

    sources: tuple[str, ...] = SOURCES
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    num_matches: int = 8
    layer_decay: float = 0.7
    own_decay: float = 0.9

    def __post_init__(self) -> None:
        unknown = set(self.sources) - set(SOURCES)
        if unknown or not self.sources:
            raise ValueError(f"PredictorConfig.sources must be a non-empty subset of {SOURCES}, "
                             f"got {self.sources}")
        if len(self.weights) != len(SOURCES) or any(w < 0 for w in self.weights):
            raise ValueError(f"PredictorConfig.weights must be {len(SOURCES)} non-negative "
                             f"numbers, got {self.weights}")
        if self.num_matches <= 0:
            raise ValueError(f"PredictorConfig.num_matches must be positive, "
                             f"got {self.num_matches}")
        for name in ("layer_decay", "own_decay"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"PredictorConfig.{name} must be in (0, 1], "
                                 f"got {getattr(self, name)}")

    def weight(self, source: str) -> float:
        """The mixing weight of `source` (0 when it is not used)."""
        return self.weights[SOURCES.index(source)] if source in self.sources else 0.0


class RequestPredictor:
    """Follows one request layer by layer and predicts what it will need.

    Call `observe` after each layer runs, and `need` (or `source_shares`) in between.
    """

    def __init__(self, collection: TraceCollection, config: PredictorConfig) -> None:
        self.collection = collection
        self.config = config
        shape = collection.shape
        self.num_layers = shape.num_moe_layers
        dims = (self.num_layers, shape.num_experts)
        self._observed = np.zeros(dims, dtype=np.float32)  # [L, E] every token so far
        self._prefill = np.zeros(dims, dtype=np.float32)  # [L, E]
        self._recent = np.zeros(dims, dtype=np.float32)  # [L, E] decode, recency-weighted
        self._decoded = False
        self._matched = collection.mean_distribution()  # [L, E]

    def observe(self, step: int, layer: int, counts: np.ndarray) -> None:
        """Layer `layer` of step `step` (0: prefill) routed `counts` `[E]` tokens per expert."""
        self._observed[layer] += counts
        if step == 0:
            self._prefill[layer] += counts
        else:
            if layer == 0:
                self._recent *= self.config.own_decay
            self._recent[layer] += counts
            self._decoded = True
        if step == 0 or layer == self.num_layers - 1:
            self._rematch()

    def observe_step(self, step: int, counts: np.ndarray) -> None:
        """Every layer of step `step` at once, `counts` `[L, E]`: what `observe` of each layer
        in turn does. A decode step is one update of each array and one match (made after its
        last layer either way); a prefill is matched after each layer, as `observe` does (a
        match that finds nothing keeps the previous one, so the layers are taken in turn)."""
        if step == 0:
            for layer in range(counts.shape[0]):
                self.observe(step, layer, counts[layer])
            return
        self._observed += counts
        self._recent *= self.config.own_decay
        self._recent += counts
        self._decoded = True
        self._rematch()

    def _rematch(self) -> None:
        if len(self.collection) == 0 or "trace" not in self.config.sources:
            return
        match = self.collection.match(self._observed, top=self.config.num_matches)
        weights = np.clip(match.similarities, 0.0, None)  # [M]
        if weights.sum() <= 0:
            return
        dists = self.collection.distributions(match.indices)  # [M, L, E]
        self._matched = np.tensordot(weights / weights.sum(), dists, axes=1)  # [L, E]

    def source_shares(self, layer: int, lookahead: np.ndarray | None) -> dict[str, np.ndarray]:
        """Each used source's `[L, E]` shares, seen while layer `layer` runs.

        Args:
            layer: The layer running now.
            lookahead: `[E]` the next layer's router on this layer's hidden state, if the next
                layer belongs to the same step.
        """
        out: dict[str, np.ndarray] = {}
        if "trace" in self.config.sources:
            out["trace"] = self._matched
        if "own" in self.config.sources:
            out["own"] = row_shares(self._recent if self._decoded else self._prefill)
        if "lookahead" in self.config.sources and lookahead is not None \
                and layer + 1 < self.num_layers:
            look = np.zeros_like(self._observed)
            look[layer + 1] = row_shares(lookahead)
            out["lookahead"] = look
        return out

    def need(self, layer: int, lookahead: np.ndarray | None) -> np.ndarray:
        """`[L, E]` predicted need of every expert while layer `layer` runs: the weighted mix of
        the sources, each layer scaled by the layer-distance decay."""
        shares = self.source_shares(layer, lookahead)
        mix = np.zeros_like(self._observed)
        total = np.zeros((self.num_layers, 1), dtype=np.float32)
        for source, value in shares.items():
            w = self.config.weight(source)
            mix += w * value
            total += w * value.any(axis=-1, keepdims=True)  # only layers the source covers
        mix = np.divide(mix, total, out=np.zeros_like(mix), where=total > 0)
        decay = self.config.layer_decay ** (layer_distance(self.num_layers, layer) - 1)  # [L]
        return mix * decay[:, None].astype(np.float32)
