"""Where each projection of one expert sits inside its contiguous block.

Every expert is stored as one block of `3 * I * D` elements: gate `[I, D]`, then up `[I, D]`, then
down `[D, I]`, each row-major. One block per expert means one copy per expert fetch, and the same
layout in host memory, in a GPU slot and in a packed file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ExpertLayout"]


@dataclass(frozen=True)
class ExpertLayout:
    """The block layout of one expert.

    Attributes:
        hidden_size: D.
        intermediate_size: I.
        dtype: Storage dtype of the block.
    """

    hidden_size: int
    intermediate_size: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        if self.hidden_size <= 0 or self.intermediate_size <= 0:
            raise ValueError("ExpertLayout sizes must be positive")

    @property
    def numel(self) -> int:
        """Elements of one block."""
        return 3 * self.intermediate_size * self.hidden_size

    @property
    def nbytes(self) -> int:
        """Bytes of one block."""
        return self.numel * self.dtype.itemsize

    def views(self, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(gate [I, D], up [I, D], down [D, I])` views of a 1-D `block` of `numel` elements."""
        d, i = self.hidden_size, self.intermediate_size
        gate = block[: i * d].view(i, d)
        up = block[i * d : 2 * i * d].view(i, d)
        down = block[2 * i * d :].view(d, i)
        return gate, up, down

    def grouped_views(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(gate_up [R, 2I, D], down [R, D, I])` strided views of `rows` `[R, numel]`."""
        d, i, r = self.hidden_size, self.intermediate_size, rows.shape[0]
        return rows[:, : 2 * i * d].view(r, 2 * i, d), rows[:, 2 * i * d :].view(r, d, i)

    def stacked_views(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(gate [R, I, D], up [R, I, D], down [R, D, I])` strided views of `rows` `[R, numel]`
        (one block per row), e.g. for gathering experts by row index."""
        d, i, r = self.hidden_size, self.intermediate_size, rows.shape[0]
        return (rows[:, : i * d].view(r, i, d), rows[:, i * d : 2 * i * d].view(r, i, d),
                rows[:, 2 * i * d :].view(r, d, i))

    def pack(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
             out: torch.Tensor) -> None:
        """Write one expert's three matrices into the 1-D block `out`."""
        g, u, dn = self.views(out)
        g.copy_(gate)
        u.copy_(up)
        dn.copy_(down)
