"""Replayed routing, for benchmarks: recorded expert choices played back step by step on the
device, mapped onto another model's layers and experts.

Dimension key: S recorded steps, L layers, K experts per token, N tokens of a call, E experts.

A `RoutingTape` is what was recorded: `ids [S, L_s, K_s]`, one token's K_s distinct experts of
each of L_s MoE layers at each of S steps, out of E_s experts (moe-infinity's `trace` records
them from the embedded model; `moe_infinity.load_routing_tape` reads its trace files). `mapped`
fits a tape to a target model of L_t MoE layers, E_t experts and top-K_t:

- Layers are cycled: target MoE layer j replays source layer `j % L_s`.
- Experts: each source expert becomes a group of `g = ceil(K_t / K_s)` target experts (so a token
  still touches K_t of them), placed by a fixed random permutation of the target's experts, one
  per target layer (hot experts differ per layer, as they do in a real model). Source expert e
  of target layer j becomes `perm_j[(e * g + i) % E_t]` for i < g, and a token keeps the first
  K_t of its K_s * g experts. When `E_s * g <= E_t` the map is injective: the target sees exactly
  the source's reuse pattern (a group always travels together, as one expert g times the size
  would). Otherwise (the target has fewer experts) it is surjective, and a token whose experts
  collide takes the next free expert (`(x + 1) % E_t`) so its K_t ids stay distinct.

A tape may also carry what the recorded model's lookahead said (`lookahead [S, L_s, E_s]`: layer
l's router applied to layer l-1's hidden state at each step, as moe-infinity's tracer records
it). Mapped, each target expert gets the score of the source expert it stands for (the largest,
where several do). A replayed layer then answers `lookahead_scores` with the recording, so a
lookahead prefetcher foresees replayed routing as well as it foresaw the recorded model's, where
the target's own router (which no longer routes) would guess blindly.

`ReplayRouting` plays one layer of a (mapped) tape. Each call is one step: token i of the call
reads step `(position + i * row_stride) % S` and the position advances by one, on the device
(`add_` on a device counter), so a captured decode step replays the tape too. At batch 1 each
decode step reads the next recorded step, in order; rows of a batch read the tape `row_stride`
steps apart, so each row replays its own stretch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ReplayRouting", "RoutingTape"]


@dataclass(frozen=True)
class RoutingTape:
    """Recorded routing: one token's experts per layer per step.

    Attributes:
        ids: `[S, L, K]` int64, each row K distinct experts in `[0, num_experts)`.
        num_experts: E of the model it was recorded on.
        lookahead: `[S, L, E]` float32 recorded lookahead scores (row l: how likely each expert
            of layer l looked from layer l-1's hidden state), or None.
    """

    ids: torch.Tensor
    num_experts: int
    lookahead: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.ids.ndim != 3 or 0 in self.ids.shape:
            raise ValueError(f"RoutingTape.ids must be a non-empty [S, L, K] tensor, got "
                             f"{list(self.ids.shape)}")
        if self.ids.dtype != torch.int64:
            raise ValueError(f"RoutingTape.ids must be int64, got {self.ids.dtype}")
        if self.ids.min() < 0 or self.ids.max() >= self.num_experts:
            raise ValueError(f"RoutingTape.ids must lie in [0, {self.num_experts})")
        ordered = self.ids.sort(dim=-1).values
        if (ordered[..., 1:] == ordered[..., :-1]).any():
            raise ValueError("RoutingTape.ids repeat an expert within a token's K")
        want = (*self.ids.shape[:2], self.num_experts)
        if self.lookahead is not None and tuple(self.lookahead.shape) != want:
            raise ValueError(f"RoutingTape.lookahead must be {list(want)}, got "
                             f"{list(self.lookahead.shape)}")

    @property
    def num_steps(self) -> int:
        """S."""
        return int(self.ids.shape[0])

    @property
    def num_layers(self) -> int:
        """L."""
        return int(self.ids.shape[1])

    @property
    def top_k(self) -> int:
        """K."""
        return int(self.ids.shape[2])

    def mapped(self, num_layers: int, num_experts: int, top_k: int, seed: int = 0
               ) -> RoutingTape:
        """This tape fitted to a model of `num_layers` MoE layers, `num_experts` experts and
        top-`top_k` (see the module docstring); the same tape, permutations drawn from `seed`."""
        if num_layers <= 0 or not 0 < top_k <= num_experts:
            raise ValueError(f"cannot map onto {num_layers} layers of {num_experts} experts, "
                             f"top-{top_k}")
        group = -(-top_k // self.top_k)  # ceil
        generator = torch.Generator().manual_seed(seed)
        layers, looks = [], []
        for j in range(num_layers):
            source = self.ids[:, j % self.num_layers]  # [S, K_s]
            perm = torch.randperm(num_experts, generator=generator)  # [E_t]
            spread = source[:, :, None] * group + torch.arange(group)  # [S, K_s, g]
            wanted = spread.reshape(self.num_steps, -1)[:, :top_k] % num_experts  # [S, K_t]
            layers.append(perm[_distinct(wanted, num_experts)])
            if self.lookahead is not None:
                targets = perm[(torch.arange(self.num_experts)[:, None] * group
                                + torch.arange(group)) % num_experts]  # [E_s, g]
                scores = self.lookahead[:, j % self.num_layers, :, None].expand(
                    -1, -1, group).reshape(self.num_steps, -1)  # [S, E_s * g]
                look = torch.zeros(self.num_steps, num_experts, dtype=torch.float32)
                look.scatter_reduce_(1, targets.reshape(1, -1).expand(self.num_steps, -1),
                                     scores.float(), "amax")
                looks.append(look)
        lookahead = torch.stack(looks, dim=1) if looks else None
        return RoutingTape(torch.stack(layers, dim=1), num_experts, lookahead)


def _distinct(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """`ids` `[S, K]` with each repeat within a row moved to the next expert not yet in the row
    (cyclically); rows without repeats are unchanged."""
    out = ids.clone()
    for k in range(1, out.shape[1]):
        for _ in range(num_experts):
            clash = (out[:, k : k + 1] == out[:, :k]).any(dim=1)  # [S]
            if not clash.any():
                break
            out[clash, k] = (out[clash, k] + 1) % num_experts
    return out


class ReplayRouting:
    """One layer of a tape, replayed a step per call from a device copy; weights 1/K.

    Attributes:
        ids: `[S, K]` the layer's recorded experts (device).
        lookahead: `[S, E]` the recorded lookahead scores of the layer (device), or None.
        position: `[1]` device counter: the step the next call's first token reads.
        row_stride: Steps between the stretches that rows of a batch replay.
    """

    def __init__(self, ids: torch.Tensor, row_stride: int | None = None,
                 device: torch.device | str = "cpu",
                 lookahead: torch.Tensor | None = None) -> None:
        if ids.ndim != 2 or ids.shape[0] == 0:
            raise ValueError(f"ReplayRouting needs [S, K] ids, got {list(ids.shape)}")
        num_steps = int(ids.shape[0])
        self.row_stride = row_stride if row_stride is not None else max(1, num_steps // 64)
        if self.row_stride <= 0:
            raise ValueError(f"row_stride must be positive, got {row_stride}")
        self.ids = ids.to(device=device, dtype=torch.long)  # [S, K]
        if lookahead is not None and lookahead.shape[0] != num_steps:
            raise ValueError(f"lookahead must have {num_steps} steps, got {lookahead.shape[0]}")
        self.lookahead = None if lookahead is None else lookahead.to(device, torch.float32)
        self.position = torch.zeros(1, dtype=torch.long, device=device)

    @property
    def top_k(self) -> int:
        """K."""
        return int(self.ids.shape[1])

    def __call__(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(expert_ids [N, K], weights [N, K] float32)` for `hidden` `[N, D]`."""
        n = hidden.shape[0]
        ids = self.ids[self._steps(n, hidden.device)]  # [N, K]
        self.position.add_(1)
        weights = torch.full((n, self.top_k), 1.0 / self.top_k, device=hidden.device)
        return ids, weights

    def lookahead_scores(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """`[N, E]` the recorded lookahead of the steps the next call will replay for `hidden`'s
        `N` tokens (asked by a prefetcher while the layer before runs), or None if none was
        recorded."""
        if self.lookahead is None:
            return None
        return self.lookahead[self._steps(hidden.shape[0], hidden.device)]

    def _steps(self, n: int, device: torch.device) -> torch.Tensor:
        """`[N]` the tape step each of a call's `n` tokens reads."""
        rows = torch.arange(n, device=device) * self.row_stride  # [N]
        return (self.position + rows) % self.ids.shape[0]

    def rewind(self) -> None:
        """Start again from the tape's first step."""
        self.position.zero_()
