"""The on-demand offloaded executor: a layer's experts come from a shared GPU slot cache, misses
are fetched when the layer needs them, and a cold expert may be computed on the CPU instead.

Dimension key: T tokens, K experts per token, D hidden, N tokens of one expert.

Per call (one MoE layer): group the tokens by expert (one host read of the routing, see
`TokenGroups`); drop this layer's prefetches that the routing did not ask for (stale); pin every
needed expert and submit demand copies for all the misses before computing anything, so the
copies overlap the compute of the experts already resident; then compute each expert as one
matrix-product trio on all its tokens, waiting only for its own copy. Experts the CPU rule picks
(absent ones only) are computed from the host store while the GPU works (MoE-Infinity's
fetch-on-miss plus llama.cpp's CPU experts; DESIGN.md: at batch 1 the CPU can beat PCIe).

When one layer needs more experts than the pool can pin at once (a big batch in a small pool),
the experts are processed in waves that each fit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from moe_core.expert_id import ExpertId
from moe_core.offload.slot_cache import ExpertSlotCache
from moe_core.offload.token_groups import TokenGroups, expert_mlp

__all__ = ["CpuComputeRule", "OffloadedExecutor"]

CpuComputeRule = Callable[[ExpertId, int], bool]
"""`rule(expert, num_tokens)`: compute this absent expert on the CPU instead of fetching it."""


class OffloadedExecutor:
    """`ExpertExecutor` of one MoE layer over an `ExpertSlotCache` shared by all layers.

    Attributes:
        cache: The shared slot cache (and its stats).
        layer: Decoder-layer index of this MoE block.
        cpu_compute_rule: Picks absent experts to compute on the CPU; None: always fetch.
    """

    def __init__(self, cache: ExpertSlotCache, layer: int,
                 cpu_compute_rule: CpuComputeRule | None = None) -> None:
        self.cache = cache
        self.layer = layer
        self.cpu_compute_rule = cpu_compute_rule

    def prefetch(self, experts: Iterable[ExpertId]) -> int:
        """Prefetch hint (experts of any layer); returns the number of copies issued."""
        return self.cache.prefetch(experts)

    def cancel_prefetches(self) -> int:
        """Cancel every prefetch in flight and not yet used; returns how many were cancelled."""
        return self.cache.cancel_prefetches()

    def __call__(self, hidden: torch.Tensor, expert_ids: torch.Tensor,
                 weights: torch.Tensor) -> torch.Tensor:
        """See `ExpertExecutor`: `hidden` `[T, D]`, ids and weights `[T, K]` -> `[T, D]`."""
        groups = TokenGroups.build(expert_ids, weights, self.cache.store.num_experts,
                                   hidden.dtype)
        needed = [ExpertId(self.layer, e) for e in groups.experts()]
        self._drop_stale_prefetches(needed)
        on_cpu = [x for x in needed if self._on_cpu(x, groups.counts[x.expert])]
        cpu_set = set(on_cpu)
        # Token rows go to the host before any GPU expert is enqueued: the device-to-host copy
        # is stream-ordered, so issued later it would wait for those experts' kernels.
        cpu_inputs = {x: hidden[groups.rows(x.expert)].cpu() for x in on_cpu}
        out = torch.zeros_like(hidden)  # [T, D]
        for wave in self._waves([x for x in needed if x not in cpu_set]):
            for expert in self.cache.acquire(wave):
                gate, up, down = self.cache.weights(expert)
                self._accumulate(out, hidden, groups, expert.expert, gate, up, down)
                self.cache.release(expert)
        for expert in on_cpu:  # runs on the host while the GPU works through the waves
            gate, up, down = self.cache.store.weights(expert)
            y = expert_mlp(cpu_inputs[expert], gate, up, down).to(hidden.device)  # [N, D]
            out.index_add_(0, groups.rows(expert.expert), y * groups.expert_weights(expert.expert))
            self.cache.stats.cpu_experts += 1
            self.cache.stats.cpu_tokens += groups.counts[expert.expert]
        self.cache.settle()
        return out

    # Internals ------------------------------------------------------------------------------

    @staticmethod
    def _accumulate(out: torch.Tensor, hidden: torch.Tensor, groups: TokenGroups, expert: int,
                    gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
        rows = groups.rows(expert)  # [N]
        y = expert_mlp(hidden[rows], gate, up, down)  # [N, D]
        out.index_add_(0, rows, y * groups.expert_weights(expert))

    def _on_cpu(self, expert: ExpertId, num_tokens: int) -> bool:
        rule = self.cpu_compute_rule
        return rule is not None and self.cache.is_absent(expert) and rule(expert, num_tokens)

    def _drop_stale_prefetches(self, needed: list[ExpertId]) -> None:
        """This layer has routed: its prefetches it does not use are stale."""
        wanted = set(needed)
        stale = [e for e in self.cache.pending_prefetches(self.layer) if e not in wanted]
        if stale:
            self.cache.cancel_prefetches(stale)

    def _waves(self, experts: list[ExpertId]) -> Iterable[list[ExpertId]]:
        """Split `experts` into groups that can all be pinned at once.

        Relies on nothing being pinned between calls (every executor releases what it
        acquires). Experts already on their way (prefetched) hold their own slots, so they go
        first and cost no capacity.
        """
        pending = set(self.cache.pending_prefetches())
        todo = sorted(experts, key=lambda e: e not in pending)  # prefetched first (stable)
        while todo:
            capacity = self.cache.capacity()
            if capacity < 1 and todo[0] not in pending:
                self.cache.cancel_prefetches()  # other layers' prefetches block the pool
                pending.clear()
                capacity = self.cache.capacity()
            wave: list[ExpertId] = []
            while todo and (todo[0] in pending or len(wave) < capacity):
                wave.append(todo.pop(0))
            yield wave
