"""Tokens grouped by routed expert, and one expert's MLP on raw weight views.

Dimension key: T tokens, K experts per token, D hidden, I expert width, N tokens of one expert.

The offloaded executors need, before computing anything, which experts a layer uses and how many
tokens each gets: that is one host read of the routing (`bincount(...).tolist()`), the same one
`LocalExperts` makes. It is the only host synchronisation per layer; everything else stays on the
device.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.nn.functional as F

__all__ = ["TokenGroups", "expert_mlp", "expert_mlp_into"]


@dataclass(frozen=True)
class TokenGroups:
    """The token-expert assignments of one layer, sorted by expert.

    Attributes:
        counts: Tokens per expert `[E]`, on the host.
        starts: Where each expert's assignments start in the sorted order `[E]`, on the host.
        token_of: `[T*K]` token index of each sorted assignment (device).
        weights: `[T*K]` routing weight of each sorted assignment, in the hidden dtype (device).
    """

    counts: list[int]
    starts: list[int]
    token_of: torch.Tensor
    weights: torch.Tensor

    @classmethod
    def build(cls, expert_ids: torch.Tensor, weights: torch.Tensor, num_experts: int,
              dtype: torch.dtype) -> TokenGroups:
        """Group `expert_ids` `[T, K]` / `weights` `[T, K]` (one host read of the counts)."""
        k = expert_ids.shape[1]
        flat_ids = expert_ids.reshape(-1)  # [T*K]
        order = torch.argsort(flat_ids, stable=True)
        counts = torch.bincount(flat_ids, minlength=num_experts).tolist()  # the host read
        starts = [0, *accumulate(counts)][:-1]
        return cls(counts, starts, order // k, weights.reshape(-1)[order].to(dtype))

    def experts(self) -> list[int]:
        """Experts with at least one token, ascending."""
        return [e for e, n in enumerate(self.counts) if n]

    def span(self, expert: int) -> slice:
        """Where `expert`'s assignments sit in the sorted order."""
        start = self.starts[expert]
        return slice(start, start + self.counts[expert])

    def rows(self, expert: int) -> torch.Tensor:
        """Token indices `[N]` routed to `expert`."""
        return self.token_of[self.span(expert)]

    def expert_weights(self, expert: int) -> torch.Tensor:
        """Routing weights `[N, 1]` of `expert`'s tokens."""
        return self.weights[self.span(expert), None]

    def group_offsets(self, groups: list[list[int]]) -> list[torch.Tensor]:
        """For each group of experts (ids whose assignments are contiguous, in order), the
        running sums of their token counts as int32 on the device (`grouped_expert_mlp`'s
        offsets): one host-to-device copy for all of them, from pinned memory on CUDA (no
        host sync)."""
        ends = [end for group in groups
                for end in accumulate(self.counts[e] for e in group)]
        host = torch.tensor(ends, dtype=torch.int32)
        device = self.token_of.device
        if device.type == "cuda":
            host = host.pin_memory()
        flat = host.to(device, non_blocking=True)
        return list(flat.split([len(group) for group in groups]))

    def sorted_inputs(self, hidden: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`hidden` `[T, D]` row per assignment, in sorted order, as `dtype`: `[T*K, D]` (one
        gather for the whole layer; each expert's inputs are then the view `[span]`)."""
        return hidden.index_select(0, self.token_of).to(dtype)

    def combine(self, outputs: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Weighted sum of the per-assignment `outputs` `[T*K, D]` (sorted order, every row
        written) into `[T, D]` shaped and typed like `like`: one scatter for the whole layer."""
        out = torch.zeros_like(like)
        weighted = outputs.to(like.dtype) * self.weights[:, None]
        return out.index_add_(0, self.token_of, weighted)


def expert_mlp(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
               down: torch.Tensor) -> torch.Tensor:
    """The gated SiLU expert of `LocalExperts` on `x` `[N, D]` with `gate`/`up` `[I, D]` and
    `down` `[D, I]` -> `[N, D]`, computed in the weights' dtype and returned in `x`'s."""
    h = x.to(gate.dtype)
    y = F.linear(F.silu(F.linear(h, gate)) * F.linear(h, up), down)  # [N, I] -> [N, D]
    return y.to(x.dtype)


def expert_mlp_into(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                    out: torch.Tensor) -> None:
    """`expert_mlp` with gate and up as one matrix `gate_up` `[2I, D]` (one product for both),
    `x` `[N, D]` already in the weights' dtype, the result written into `out` `[N, D]`: four
    kernels per expert."""
    width = down.shape[1]
    h = torch.mm(x, gate_up.t())  # [N, 2I]
    torch.mm(F.silu(h[:, :width]) * h[:, width:], down.t(), out=out)  # [N, I] -> [N, D]
