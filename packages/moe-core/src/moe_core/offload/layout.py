"""Where each projection of one expert sits inside its contiguous block.

Every expert is stored as one block of `3 * I * D` elements: gate `[I, D]`, then up `[I, D]`, then
down `[D, I]`, each row-major. One block per expert means one copy per expert fetch, and the same
layout in host memory, in a GPU slot and in a packed file.

An FP8 layout (`dtype` e4m3, see `fp8.py`) adds each output channel's float32 scale after the
weights (`[gate I][up I][down D]`), so the block's elements (bytes) are `3 * I * D` rounded up to
4, plus `4 * (2I + D)`. Slots, rings and host arenas hold FP8 blocks as they are; the executors
dequantise them just before the products (`dequantized_grouped`, `dequantized`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_core.offload.fp8 import FP8, dequantize_rows, quantize_rows

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
    def is_fp8(self) -> bool:
        """Whether blocks hold e4m3 weights with per-output-channel scales."""
        return self.dtype == FP8

    @property
    def numel(self) -> int:
        """Elements of one block (FP8: its bytes, scales included)."""
        weights = 3 * self.intermediate_size * self.hidden_size
        if not self.is_fp8:
            return weights
        return self.scale_offset + 4 * (2 * self.intermediate_size + self.hidden_size)

    @property
    def scale_offset(self) -> int:
        """Byte offset of an FP8 block's scales (4-aligned, so they view as float32)."""
        return -(-3 * self.intermediate_size * self.hidden_size // 4) * 4

    def scale_views(self, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(gate [I], up [I], down [D])` float32 scales of an FP8 `block`."""
        if not self.is_fp8:
            raise ValueError(f"a {self.dtype} block has no scales")
        i = self.intermediate_size
        scales = block[self.scale_offset :].view(torch.float32)  # [2I + D]
        return scales[:i], scales[i : 2 * i], scales[2 * i :]

    @property
    def nbytes(self) -> int:
        """Bytes of one block."""
        return self.numel * self.dtype.itemsize

    @property
    def gather_nbytes(self) -> int:
        """Device workspace of one gathered assignment (`gathered_experts`): its block, and for
        FP8 also its matrices dequantised to 16 bits (decode's dtype on the GPU)."""
        if not self.is_fp8:
            return self.nbytes
        return self.nbytes + 2 * 3 * self.intermediate_size * self.hidden_size

    def views(self, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(gate [I, D], up [I, D], down [D, I])` views of a 1-D `block` of `numel` elements."""
        d, i = self.hidden_size, self.intermediate_size
        gate = block[: i * d].view(i, d)
        up = block[i * d : 2 * i * d].view(i, d)
        down = block[2 * i * d : 3 * i * d].view(d, i)
        return gate, up, down

    def grouped_views(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(gate_up [R, 2I, D], down [R, D, I])` strided views of `rows` `[R, numel]`."""
        d, i, r = self.hidden_size, self.intermediate_size, rows.shape[0]
        return (rows[:, : 2 * i * d].view(r, 2 * i, d),
                rows[:, 2 * i * d : 3 * i * d].view(r, d, i))

    def dequantized_grouped(self, rows: torch.Tensor, dtype: torch.dtype
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """`grouped_views` of FP8 `rows` `[R, numel]`, dequantised to `dtype` (new tensors)."""
        d, i = self.hidden_size, self.intermediate_size
        gate_up, down = self.grouped_views(rows)
        scales = rows[:, self.scale_offset :].contiguous().view(torch.float32)  # [R, 2I + D]
        return (dequantize_rows(gate_up, scales[:, : 2 * i], dtype),
                dequantize_rows(down, scales[:, 2 * i : 2 * i + d], dtype))

    def dequantized(self, block: torch.Tensor, dtype: torch.dtype
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(gate [I, D], up [I, D], down [D, I])` of one FP8 `block` `[numel]`, dequantised to
        `dtype` (new tensors)."""
        i = self.intermediate_size
        gate_up, down = self.dequantized_grouped(block[None], dtype)
        return gate_up[0, :i], gate_up[0, i:], down[0]

    def matrices(self, block: torch.Tensor, dtype: torch.dtype | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(gate, up, down)` of one `block` as compute reads them: its `views`, or for FP8 its
        matrices dequantised to `dtype` (then required).

        Raises:
            ValueError: an FP8 block without a `dtype`.
        """
        if not self.is_fp8:
            return self.views(block)
        if dtype is None:
            raise ValueError("FP8 expert blocks need a dtype to be dequantised to")
        return self.dequantized(block, dtype)

    def stacked_views(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(gate [R, I, D], up [R, I, D], down [R, D, I])` strided views of `rows` `[R, numel]`
        (one block per row), e.g. for gathering experts by row index."""
        d, i, r = self.hidden_size, self.intermediate_size, rows.shape[0]
        return (rows[:, : i * d].view(r, i, d), rows[:, i * d : 2 * i * d].view(r, i, d),
                rows[:, 2 * i * d : 3 * i * d].view(r, d, i))

    def pack(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
             out: torch.Tensor) -> None:
        """Write one expert's three matrices into the 1-D block `out` (FP8: quantised, with
        their scales)."""
        if self.is_fp8:
            self.pack_layer(gate[None], up[None], down[None], out[None])
            return
        g, u, dn = self.views(out)
        g.copy_(gate)
        u.copy_(up)
        dn.copy_(down)

    def pack_layer(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                   out: torch.Tensor) -> None:
        """Write E experts' stacked matrices (`gate`, `up` `[E, I, D]`, `down` `[E, D, I]`) into
        the blocks `out` `[E, numel]` (FP8: quantised per output channel, scales after)."""
        if not self.is_fp8:
            g, u, dn = self.stacked_views(out)
            g.copy_(gate)
            u.copy_(up)
            dn.copy_(down)
            return
        i = self.intermediate_size
        weights = self.stacked_views(out)
        scales = out[:, self.scale_offset :]  # [E, 4 * (2I + D)] bytes
        parts = []
        for w, target in zip((gate, up, down), weights, strict=True):
            q, scale = quantize_rows(w)
            target.copy_(q)
            parts.append(scale)
        scales.copy_(torch.cat(parts, dim=1).view(FP8))  # [E, 2I + D] float32 as bytes
        assert scales.shape[1] == 4 * (2 * i + self.hidden_size)
