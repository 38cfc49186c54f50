"""The activation-aware prefetcher: MoE-Infinity's predictor and eviction policy driving moe-core's
real on-demand runtime, fed live by the routing it sees.

Dimension key: T tokens of a call, K experts per token, L MoE layers, E routed experts.

It is a `moe_core.Prefetcher`: the on-demand executor calls it around every MoE layer call.

- `begin_layer` (before the layer's experts are fetched): the layer's routing counts `[E]` and
  the lookahead (layer l+1's router on layer l's input, softmax summed over tokens, `[E]`) are
  computed on the device and read in one host copy; the predictor's need `[L, E]` (matched
  traces, the lookahead, the request's own recency-weighted counts, layer-distance decay; see
  `RequestPredictor`) goes to the `ActivationAwarePolicy` with the layer's experts protected,
  so this layer's misses evict what the request is least likely to need.
- `end_layer` (the layer's compute enqueued): the predictor observes the layer's counts, and up
  to `budget` of the most needed experts of the next layer to run (the next MoE layer, or the
  first one of the next step) that are absent are returned for prefetching, best first; a guess
  is dropped when the slot it would take holds an expert the policy predicts is needed at least
  as much (the simulator's refusal rule).
- `between_steps` (before a replayed, graph-captured decode step, where no layer calls back):
  the most needed absent experts of every layer, `budget` per layer, from what was observed
  eagerly (the prefill) and the matched traces. Replayed steps are not observed (their routing
  is logged on the device and counted later), so these guesses stay the prefill's.
- The sources are mixed by their recall measured so far on this model's own decode steps
  (`OnlineRecall`, the live form of the simulator's calibration; `calibrate=False` keeps the
  config's weights).
- A new request starts at `begin_sequence` (engines call `OffloadRuntime.begin_sequence`) or
  when a step has more tokens than the one before (a prefill after decode steps). The finished
  request's EAM joins the trace collection (`learn`), so matching improves as requests are
  served, as in MoE-Infinity's server.

Cost: one host read of `2 x E` floats per layer (a synchronisation; on the copy path the layer
reads its routing on the host anyway) and the predictor's numpy work (a matching per decode step,
~35 µs on the tiny model; docs/moe-infinity.md). With `budget=0` it only feeds the policy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from itertools import pairwise

import numpy as np
import torch
from moe_core import (
    ExpertId,
    ExpertSlotCache,
    MoEBlock,
    MoEForCausalLM,
    Residency,
    lookahead_scores,
)

from moe_infinity.collection import TraceCollection
from moe_infinity.online_recall import OnlineRecall
from moe_infinity.policies import ActivationAwarePolicy
from moe_infinity.predictor import PredictorConfig, RequestPredictor, layer_distance

__all__ = ["ActivationPrefetcher"]


class ActivationPrefetcher:
    """A `moe_core.Prefetcher` that feeds an `ActivationAwarePolicy` and prefetches its
    predictor's best guesses.

    Attributes:
        policy: The eviction policy it keeps informed (install it in the same cache).
        collection: Past requests' EAMs (grows as requests finish, with `learn`).
        config: The predictor's settings.
        budget: Experts prefetched per layer call (0: only feed the policy).
        learn: Add each finished request's EAM to the collection.
        recall: Each source's recall so far (None: the config's weights are kept).
        requests: Requests seen so far (finished and running).
    """

    def __init__(self, model: MoEForCausalLM, policy: ActivationAwarePolicy,
                 collection: TraceCollection, config: PredictorConfig | None = None,
                 budget: int = 0, learn: bool = True, calibrate: bool = True) -> None:
        blocks = model.moe_blocks()
        if len(blocks) != collection.shape.num_moe_layers or \
                blocks[0].spec.num_experts != collection.shape.num_experts:
            raise ValueError(f"the collection is for {collection.shape.describe()}, not this "
                             f"model ({len(blocks)} MoE layers x {blocks[0].spec.num_experts} "
                             "experts)")
        if budget < 0:
            raise ValueError(f"budget must be >= 0, got {budget}")
        self.policy = policy
        self.collection = collection
        self.config = config if config is not None else PredictorConfig()
        self.budget = budget
        self.learn = learn
        self.recall = OnlineRecall(max(budget, collection.shape.top_k)) if calibrate else None
        self.requests = 0
        self._layers = [b.layer for b in blocks]
        self._row = {layer: row for row, layer in enumerate(self._layers)}
        self._next: dict[int, MoEBlock] = {a.layer: b for a, b in pairwise(blocks)}
        self._num_experts = collection.shape.num_experts
        self._predictor = RequestPredictor(collection, self.config)
        self._step = -1  # the running request's step (0: its prefill), -1 before it starts
        self._step_tokens = 0  # tokens of the running step
        self._seen = np.zeros((len(blocks), self._num_experts), dtype=np.float32)  # [L, E]
        self._pending: tuple[int, np.ndarray, np.ndarray] | None = None  # row, counts, need
        self._foreseen: dict[str, np.ndarray] = {}  # each source's [E] for the next layer

    # The Prefetcher protocol ------------------------------------------------------------------

    def begin_layer(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor,
                    cache: ExpertSlotCache) -> None:
        """Predict from the layer's routing and lookahead; tell the policy (one host read)."""
        row = self._row[layer]
        if row == 0:
            self._next_step(int(hidden.shape[0]))
        with torch.no_grad():
            flat = expert_ids.reshape(-1)
            counts = torch.zeros(self._num_experts, dtype=torch.float32, device=flat.device)
            counts.index_add_(0, flat, torch.ones(flat.shape, dtype=torch.float32,
                                                  device=flat.device))  # [E]
            nxt = self._next.get(layer)
            use_look = nxt is not None and "lookahead" in self.config.sources
            look = (lookahead_scores(nxt, hidden).sum(dim=0)
                    if use_look and nxt is not None else torch.zeros_like(counts))  # [E]
            both = torch.stack([counts, look.to(counts.device)]).cpu().numpy()  # [2, E]
        look_np = both[1] if use_look else None
        self._calibrate(both[0], row, look_np)
        need = self._predictor.need(row, look_np)  # [L, E]
        in_use = frozenset(ExpertId(layer, int(e)) for e in np.flatnonzero(both[0]))
        self.policy.update(need, in_use)
        self._pending = (row, both[0], need)

    def end_layer(self, layer: int, cache: ExpertSlotCache) -> list[ExpertId]:
        """Observe the layer; the next layer's most needed absent experts (up to `budget`)."""
        if self._pending is None:
            return []
        row, counts, need = self._pending
        self._pending = None
        self._predictor.observe(max(self._step, 0), row, counts)
        self._seen[row] += counts
        if self.budget == 0:
            return []
        following = int(np.flatnonzero(layer_distance(len(self._layers), row) == 1)[0])
        return self._worth_fetching(cache, need, [following], self.budget)

    def between_steps(self, cache: ExpertSlotCache) -> list[ExpertId]:
        """Before a replayed step: every layer's most needed absent experts (`budget` each)."""
        if self.budget == 0 or self._step < 0:
            return []
        last = len(self._layers) - 1
        need = self._predictor.need(last, None)  # seen from the end of a step
        self.policy.update(need)
        return self._worth_fetching(cache, need, list(range(len(self._layers))), self.budget)

    def begin_sequence(self) -> None:
        """The running request is over: learn its EAM, start afresh."""
        self._finish_request()

    # Internals --------------------------------------------------------------------------------

    def _next_step(self, tokens: int) -> None:
        """The first MoE layer runs: a new step, or a new request if it is larger than the last
        step (a prefill after decode steps)."""
        if self._step >= 1 and tokens > self._step_tokens:
            self._finish_request()
        if self._step < 0:
            self.requests += 1
        self._step += 1
        self._step_tokens = tokens

    def _calibrate(self, counts: np.ndarray, row: int, look: np.ndarray | None) -> None:
        """Score the sources' last prediction (for this layer) against its routing `counts`,
        re-weight the predictor, and keep the sources' prediction for the next layer."""
        if self.recall is None:
            return
        if self._step >= 1 and self._foreseen:
            self.recall.update(self._foreseen, counts)
            config = replace(self._predictor.config, weights=self.recall.weights())
            self.config = self._predictor.config = config
        following = int(np.flatnonzero(layer_distance(len(self._layers), row) == 1)[0])
        shares = self._predictor.source_shares(row, look)
        self._foreseen = {source: value[following] for source, value in shares.items()}

    def _finish_request(self) -> None:
        if self.learn and self._seen.any():
            self.collection.add(self._seen)
        self._predictor = RequestPredictor(self.collection, self.config)
        self._seen = np.zeros_like(self._seen)
        self._step = -1
        self._step_tokens = 0
        self._pending = None
        self._foreseen = {}

    def _worth_fetching(self, cache: ExpertSlotCache, need: np.ndarray, rows: Sequence[int],
                        per_row: int) -> list[ExpertId]:
        """Of `rows`' experts, the `per_row` most needed of each that are absent and needed
        more than the expert each would evict (best first over all rows)."""
        ranked: list[tuple[float, ExpertId]] = []
        for row in rows:
            layer = self._layers[row]
            for e in np.argsort(-need[row], kind="stable")[:per_row]:
                expert = ExpertId(layer, int(e))
                if need[row, e] > 0 and cache.is_absent(expert):
                    ranked.append((float(need[row, e]), expert))
        ranked.sort(key=lambda x: -x[0])
        free = cache.table.num_slots - len(cache.table.resident())
        floor = self._victim_need(cache) if len(ranked) > free else 0.0
        return [e for i, (n, e) in enumerate(ranked) if i < free or n > floor]

    def _victim_need(self, cache: ExpertSlotCache) -> float:
        """The predicted need of the expert the policy would evict now (inf: none can be)."""
        table = cache.table
        candidates = [e for e in table.resident()
                      if table.state(e) is Residency.READY and not table.is_pinned(e)]
        if not candidates:
            return float("inf")
        return self.policy.need_of(self.policy.choose_victim(candidates))
