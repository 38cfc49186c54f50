"""Replay traced requests through a simulated expert cache under one policy and cache size.

Dimension key: S steps of a request, L MoE layers, E routed experts.

Requests run in order through one cache (a server keeps its experts between requests). At each
step, layer by layer: the predictor's need is handed to an activation-aware policy, the layer's
experts are used (hits and misses, see `ExpertCache`), prefetches for the layers ahead are
issued, and the predictor observes what the layer routed. A prefetch issued while layer l runs
is assumed to land before the layer it is for (the lookahead makes its prediction exactly then).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from moe_core import EvictionPolicy, ExpertId, LFUPolicy, LRUPolicy, SettingError

from moe_infinity.cache_model import ExpertCache
from moe_infinity.collection import TraceCollection
from moe_infinity.model_shape import ModelShape
from moe_infinity.policies import ActivationAwarePolicy, BeladyPolicy
from moe_infinity.policy_setup import PolicySetup
from moe_infinity.predictor import SOURCES, PredictorConfig, RequestPredictor, layer_distance
from moe_infinity.trace import RequestTrace

__all__ = ["H200_PCIE_BYTES_PER_S", "SimulationConfig", "SimulationResult", "access_string",
           "num_slots", "simulate"]

H200_PCIE_BYTES_PER_S = 54.7e9
"""Pinned host-to-GPU copy bandwidth measured on the H200 test machine (docs: DESIGN.md)."""


@dataclass(frozen=True, kw_only=True)
class SimulationConfig:
    """One simulated configuration.

    Attributes:
        cache_fraction: Share of all routed experts the GPU cache holds, in (0, 1].
        prefetch_budget: Experts prefetched per layer step (None: the model's top-k).
        prefetch_horizon: How many layers ahead prefetches may target (1: the next layer only,
            where the lookahead applies).
        bandwidth_bytes_per_s: Host-to-GPU bandwidth for the time estimate.
        predictor: The predictor's settings (its lookahead source is dropped for
            `-nolookahead` set-ups).
    """

    cache_fraction: float
    prefetch_budget: int | None = None
    bandwidth_bytes_per_s: float = H200_PCIE_BYTES_PER_S
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    prefetch_horizon: int = 1

    def __post_init__(self) -> None:
        if self.prefetch_horizon <= 0:
            raise SettingError(f"prefetch horizon must be positive, got {self.prefetch_horizon}")
        if not 0.0 < self.cache_fraction <= 1.0:
            raise SettingError(f"cache fraction must be in (0, 1], got {self.cache_fraction}")
        if self.prefetch_budget is not None and self.prefetch_budget <= 0:
            raise SettingError(f"prefetch budget must be positive, got {self.prefetch_budget}")
        if self.bandwidth_bytes_per_s <= 0:
            raise SettingError(f"bandwidth must be positive, got {self.bandwidth_bytes_per_s}")


@dataclass(frozen=True)
class SimulationResult:
    """What one policy did at one cache size.

    Attributes:
        policy: The set-up's name.
        cache_fraction: The cache size as a share of all routed experts.
        num_slots: The cache size in experts.
        accesses, hits: Expert uses and hits over all steps.
        decode_accesses, decode_hits: The same over decode steps only.
        misses: Demand fetches.
        prefetches, prefetches_used: Prefetch fetches, and those used before eviction.
        decode_fetches: Fetches (demand and prefetch) issued during decode steps.
        prompt_tokens, decode_tokens: Tokens prefilled and decoded.
        expert_bytes: Bytes per expert fetch.
        bandwidth_bytes_per_s: For the time estimate.
    """

    policy: str
    cache_fraction: float
    num_slots: int
    accesses: int
    hits: int
    decode_accesses: int
    decode_hits: int
    misses: int
    prefetches: int
    prefetches_used: int
    decode_fetches: int
    prompt_tokens: int
    decode_tokens: int
    expert_bytes: int
    bandwidth_bytes_per_s: float

    @property
    def hit_rate(self) -> float:
        """Hits over all expert uses."""
        return self.hits / self.accesses if self.accesses else 0.0

    @property
    def decode_hit_rate(self) -> float:
        """Hits over decode-step expert uses."""
        return self.decode_hits / self.decode_accesses if self.decode_accesses else 0.0

    @property
    def prefetch_precision(self) -> float:
        """Prefetched experts used before eviction, over prefetches (0 without prefetching)."""
        return self.prefetches_used / self.prefetches if self.prefetches else 0.0

    @property
    def prefetch_recall(self) -> float:
        """Uses served by a prefetch, over uses that needed a fetch (prefetched or demand)."""
        fetched_uses = self.prefetches_used + self.misses
        return self.prefetches_used / fetched_uses if fetched_uses else 0.0

    @property
    def bytes_per_token(self) -> float:
        """Host-to-GPU bytes per decoded token (demand and prefetch)."""
        return self.decode_fetches * self.expert_bytes / max(self.decode_tokens, 1)

    @property
    def seconds_per_token(self) -> float:
        """Estimated decode time per token if PCIe is the bottleneck: bytes / bandwidth (a
        lower bound; compute, launch and sync costs are not modelled)."""
        return self.bytes_per_token / self.bandwidth_bytes_per_s

    def to_dict(self) -> dict[str, object]:
        """Every field and derived rate, JSON-ready."""
        out: dict[str, object] = dict(self.__dict__)
        for name in ("hit_rate", "decode_hit_rate", "prefetch_precision", "prefetch_recall",
                     "bytes_per_token", "seconds_per_token"):
            out[name] = getattr(self, name)
        return out


def num_slots(shape: ModelShape, cache_fraction: float) -> int:
    """Cache slots for `cache_fraction` of the model's routed experts (at least one)."""
    return max(1, round(cache_fraction * shape.total_experts))


def access_string(traces: Sequence[RequestTrace], shape: ModelShape) -> list[ExpertId]:
    """Every expert use of `traces`, in the order the simulator makes them."""
    out: list[ExpertId] = []
    for trace in traces:
        for step in range(trace.num_steps):
            for row, layer in enumerate(shape.moe_layers):
                out.extend(ExpertId(layer, int(e)) for e in trace.experts_at(step, row))
    return out


def _policy(setup: PolicySetup, shape: ModelShape,
            traces: Sequence[RequestTrace]) -> EvictionPolicy:
    if setup.eviction == "lru":
        return LRUPolicy()
    if setup.eviction == "lfu":
        return LFUPolicy()
    if setup.eviction == "aware":
        return ActivationAwarePolicy(shape)
    return BeladyPolicy(access_string(traces, shape))


def _predictor_config(setup: PolicySetup, config: PredictorConfig) -> PredictorConfig:
    if setup.lookahead:
        return config
    sources = tuple(s for s in config.sources if s != "lookahead") or SOURCES[:1]
    return PredictorConfig(sources=sources, weights=config.weights,
                           num_matches=config.num_matches, layer_decay=config.layer_decay,
                           own_decay=config.own_decay)


class _Prefetcher:
    """Fetches the top `budget` predicted experts of the next `horizon` layers that are not
    resident yet, highest need first."""

    def __init__(self, shape: ModelShape, budget: int, horizon: int) -> None:
        self.shape = shape
        self.budget = budget
        self.horizon = horizon

    def issue(self, cache: ExpertCache, need: np.ndarray, row: int,
              in_use: list[ExpertId]) -> None:
        # Only the next `horizon` layers; the running layer's experts are in use already.
        far = layer_distance(self.shape.num_moe_layers, row) > self.horizon  # [L]
        ranked = np.where(far[:, None], 0.0, need)  # [L, E]
        order = np.argsort(-ranked, axis=None, kind="stable")[: self.budget]
        protected = set(in_use)
        num_experts = self.shape.num_experts
        for flat in order:
            if ranked.flat[flat] <= 0.0:
                break
            expert = ExpertId(self.shape.moe_layers[flat // num_experts], int(flat % num_experts))
            if expert in cache:
                continue  # predicted and already there: nothing to fetch
            if not cache.prefetch(expert, protected):
                break  # candidates come in falling need: later ones would be refused too
            protected.add(expert)
        if isinstance(cache.policy, ActivationAwarePolicy):
            cache.policy.update(need, protected)


def simulate(traces: Sequence[RequestTrace], shape: ModelShape, setup: PolicySetup,
             config: SimulationConfig, collection: TraceCollection | None = None
             ) -> SimulationResult:
    """Replay `traces` in order through a cache of `config.cache_fraction` under `setup`.

    Args:
        traces: The requests to replay, in order.
        shape: Their model's shape.
        setup: The policy.
        config: Cache size, prefetch budget, bandwidth and predictor settings.
        collection: Past traces for the predictor (needed by activation-aware and prefetching
            set-ups; an empty one is used if None).
    """
    cache = ExpertCache(num_slots(shape, config.cache_fraction), _policy(setup, shape, traces))
    aware = cache.policy if isinstance(cache.policy, ActivationAwarePolicy) else None
    predictor_config = _predictor_config(setup, config.predictor)
    prefetcher = _Prefetcher(shape, config.prefetch_budget or shape.top_k,
                             config.prefetch_horizon) if setup.prefetch else None
    collection = collection if collection is not None else TraceCollection(shape, 1)
    layers = shape.moe_layers
    decode_accesses = decode_hits = decode_fetches = 0
    for trace in traces:
        predictor = RequestPredictor(collection, predictor_config) \
            if setup.uses_predictor else None
        for step in range(trace.num_steps):
            fetches_before = cache.misses + cache.prefetches
            for row, layer in enumerate(layers):
                group = [ExpertId(layer, int(e)) for e in trace.experts_at(step, row)]
                need = None
                if predictor is not None:
                    ahead = row + 1 < len(layers) and setup.lookahead
                    need = predictor.need(row, trace.lookahead[step, row + 1] if ahead else None)
                    if aware is not None:
                        aware.update(need, frozenset(group))
                hits = sum(cache.access(e) for e in group)
                if step > 0:
                    decode_accesses += len(group)
                    decode_hits += hits
                if prefetcher is not None and need is not None:
                    prefetcher.issue(cache, need, row, group)
                if predictor is not None:
                    predictor.observe(step, row, trace.step_counts[step, row])
            if step > 0:
                decode_fetches += cache.misses + cache.prefetches - fetches_before
    return SimulationResult(
        policy=setup.name, cache_fraction=config.cache_fraction, num_slots=cache.num_slots,
        accesses=cache.hits + cache.misses, hits=cache.hits, decode_accesses=decode_accesses,
        decode_hits=decode_hits, misses=cache.misses, prefetches=cache.prefetches,
        prefetches_used=cache.prefetches_used, decode_fetches=decode_fetches,
        prompt_tokens=sum(t.num_prompt_tokens for t in traces),
        decode_tokens=sum(t.num_decode_tokens for t in traces), expert_bytes=shape.expert_bytes,
        bandwidth_bytes_per_s=config.bandwidth_bytes_per_s)
