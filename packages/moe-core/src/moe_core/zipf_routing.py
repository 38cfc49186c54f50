"""Skewed routing with temporal locality, for benchmarks: a Zipf law over each layer's experts and
a tunable chance that a token keeps an expert its row used at the previous step.

Dimension key: N tokens of a call, E routed experts, K experts per token.

Real routing is neither uniform nor memoryless: a few experts of each layer take most tokens (the
tiny model's heat map, docs/tiny-model.md), and a sequence keeps using experts it used a moment
ago. `ZipfRouting` models both with two numbers:

- `s`, the Zipf exponent: the expert of popularity rank r (0-based) is drawn with probability
  proportional to `1 / (r + 1) ** s` (s = 0 is uniform). Which expert holds which rank is a
  fixed permutation per layer, so every layer has its own hot experts.
- `reuse`: each of a token's K places keeps, with this probability, the expert that place held
  at the previous call of the same layer (the same row's previous decode step); the other places
  are drawn afresh from the Zipf law among the experts not kept, so the K ids stay distinct.
  (A fresh draw can also pick an expert used before, so the measured overlap with the previous
  step is a little above `reuse`; the tests measure both.)

Everything is drawn on the device from torch's default generator with tensor operations only
(K distinct draws without replacement by the Gumbel-top-k trick), so a captured decode step can
use it: each replay draws afresh and remembers its ids in a persistent buffer.

"The previous call" is the previous forward pass through the layer: at decode, token i of a call
is row i of the batch, so it is that row's previous step. A prefill's token i follows token i of
the pass before it (there is no earlier step of a prompt token; the rule only has to be fixed).
"""

from __future__ import annotations

import torch

__all__ = ["ZipfRouting", "zipf_log_probs"]

_MIN_ROWS = 64
"""Rows the memory of the previous step holds at first (the largest decode bucket), so that a
captured step never has to grow it."""

_KEEP = 1e9
"""Score that forces a kept expert into the top K (Gumbel scores are far below it)."""


def zipf_log_probs(num_experts: int, s: float, permutation: torch.Tensor) -> torch.Tensor:
    """`[E]` log-probabilities of the Zipf law with exponent `s`, expert `permutation[r]` holding
    rank r (the most popular first)."""
    ranks = torch.arange(num_experts, dtype=torch.float64)
    log_p = -s * torch.log1p(ranks)
    log_p = log_p - torch.logsumexp(log_p, dim=0)
    out = torch.empty(num_experts, dtype=torch.float64)
    out[permutation.cpu()] = log_p
    return out.float()


class ZipfRouting:
    """Each token's K experts: kept from its row's previous step with probability `reuse` each,
    the rest drawn without replacement from a Zipf law over the layer's experts; weights 1/K.

    Attributes:
        num_experts: E.
        top_k: K.
        s: Zipf exponent (0: uniform).
        reuse: Probability that a place keeps its previous expert, in [0, 1].
        log_probs: `[E]` the layer's Zipf log-probabilities (device).
    """

    def __init__(self, num_experts: int, top_k: int, s: float, reuse: float,
                 permutation: torch.Tensor, device: torch.device | str = "cpu") -> None:
        if not 0 < top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
        if s < 0:
            raise ValueError(f"the Zipf exponent s must be >= 0, got {s}")
        if not 0.0 <= reuse <= 1.0:
            raise ValueError(f"reuse must be in [0, 1], got {reuse}")
        if sorted(permutation.tolist()) != list(range(num_experts)):
            raise ValueError(f"permutation must be a permutation of range({num_experts})")
        self.num_experts = num_experts
        self.top_k = top_k
        self.s = s
        self.reuse = reuse
        self.log_probs = zipf_log_probs(num_experts, s, permutation).to(device)  # [E]
        self._previous: torch.Tensor | None = None  # [R, K] each row's last ids (device)

    def __call__(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(expert_ids [N, K], weights [N, K] float32)` for `hidden` `[N, D]`."""
        n = hidden.shape[0]
        previous = self._memory(n, hidden.device)[:n]  # [N, K]
        keep = torch.rand(n, self.top_k, device=hidden.device) < self.reuse  # [N, K]
        scores = self._gumbel_scores(n, hidden.device)  # [N, E]
        # A kept expert's score is raised above every draw: it is in the top K for sure, and the
        # remaining places go to the best fresh draws among the others (distinct by topk).
        scores.scatter_(1, previous, torch.where(keep, _KEEP, scores.gather(1, previous)))
        ids = scores.topk(self.top_k, dim=-1).indices  # [N, K]
        # Keep each kept expert in its own place (so "the expert that place held" is stable).
        ids = self._align(ids, previous, keep)
        previous.copy_(ids)
        weights = torch.full((n, self.top_k), 1.0 / self.top_k, device=hidden.device)
        return ids, weights

    def lookahead_scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """`[N, E]` how likely each expert is at the next call for `hidden`'s `N` tokens (asked
        by a lookahead prefetcher while the layer before runs): `reuse` for each expert the row
        holds now, plus `(1 - reuse) * min(1, K * p_e)` for a fresh draw. What a perfectly
        calibrated router would say; not the draw itself."""
        n = hidden.shape[0]
        held = self._memory(n, hidden.device)[:n]  # [N, K]
        fresh = (self.top_k * self.log_probs.exp()).clamp(max=1.0) * (1.0 - self.reuse)  # [E]
        scores = fresh.expand(n, -1).clone()  # [N, E]
        return scores.scatter_add_(1, held, torch.full(held.shape, self.reuse,
                                                       device=hidden.device))

    # Internals --------------------------------------------------------------------------------

    def _gumbel_scores(self, n: int, device: torch.device) -> torch.Tensor:
        """`[N, E]` log-probability plus Gumbel noise: the top K of a row are K draws without
        replacement from the law (Gumbel-top-k)."""
        u = torch.rand(n, self.num_experts, device=device).clamp_(min=1e-20)
        return self.log_probs - torch.log(-torch.log(u))

    def _align(self, ids: torch.Tensor, previous: torch.Tensor, keep: torch.Tensor
               ) -> torch.Tensor:
        """`ids` `[N, K]` reordered so that each kept expert sits in the place it held before and
        the fresh ones fill the other places in score order."""
        kept = torch.where(keep, previous, -1)  # [N, K] kept id per place, -1 where fresh
        is_kept = (ids[:, :, None] == kept[:, None, :]).any(dim=-1)  # [N, K] per chosen id
        fresh_rank = (~is_kept).long().cumsum(dim=1) - 1  # [N, K] order among the fresh ids
        fresh_place = (~keep).long().cumsum(dim=1) - 1  # [N, K] order among the fresh places
        # For fresh place j (its rank q among fresh places), the fresh id of rank q.
        match = (fresh_rank[:, None, :] == fresh_place[:, :, None]) & ~is_kept[:, None, :]
        fresh = (ids[:, None, :] * match).sum(dim=-1)  # [N, K] (exactly one match per place)
        return torch.where(keep, previous, fresh)

    def _memory(self, n: int, device: torch.device) -> torch.Tensor:
        """The persistent `[R, K]` ids of each row's previous step, R >= n (grown, eagerly,
        when a call has more tokens; a fresh row starts from a Zipf draw)."""
        if self._previous is None or self._previous.shape[0] < n:
            rows = max(n, _MIN_ROWS)
            start = self._gumbel_scores(rows, device).topk(self.top_k, dim=-1).indices
            if self._previous is not None:
                start[: self._previous.shape[0]] = self._previous
            self._previous = start
        return self._previous
