"""The device tier of the expert store: equal-size slots carved from one device allocation.

Dimension key: S slots, N block elements (`ExpertLayout.numel`), D hidden, I expert width.

One allocation `[S * N]` rather than one per slot: the caching allocator never fragments it, its
size is exactly what the GPU memory budget grants, and any slot can hold any expert of any layer
(every block has the same layout). Which expert is in which slot is the `ResidencyTable`'s job.
An FP8 layout's slots hold e4m3 blocks with their scales: about half a bf16 block's bytes, so the
same budget caches about twice the experts.
"""

from __future__ import annotations

import torch

from moe_core.errors import SettingError
from moe_core.offload.layout import ExpertLayout
from moe_core.sizes import format_bytes

__all__ = ["GpuSlotPool"]


class GpuSlotPool:
    """`num_slots` expert blocks in one tensor on `device` (CPU works too, for CI).

    Attributes:
        layout: The block layout of every slot.
        num_slots: S.
        device: Where the slots live.
        storage: The single allocation `[S * N]`.
    """

    def __init__(self, layout: ExpertLayout, num_slots: int,
                 device: str | torch.device = "cuda") -> None:
        """Allocate `num_slots` slots (uninitialised).

        Raises:
            ValueError: `num_slots` is not positive.
        """
        if num_slots <= 0:
            raise ValueError(f"GpuSlotPool: num_slots must be positive, got {num_slots}")
        self.layout = layout
        self.num_slots = num_slots
        self.device = torch.device(device)
        self.storage = torch.empty(num_slots * layout.numel, dtype=layout.dtype,
                                   device=self.device)  # [S * N]
        self._stacked: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def for_budget(cls, layout: ExpertLayout, budget_bytes: int,
                   device: str | torch.device = "cuda",
                   max_slots: int | None = None) -> GpuSlotPool:
        """As many slots as `budget_bytes` holds (at most `max_slots`, e.g. every expert).

        Raises:
            SettingError: the budget cannot hold a single expert block (a `ValueError`).
        """
        num_slots = budget_bytes // layout.nbytes
        if max_slots is not None:
            num_slots = min(num_slots, max_slots)
        if num_slots < 1:
            raise SettingError(f"a GPU expert budget of {format_bytes(budget_bytes)} "
                             f"({budget_bytes} bytes) cannot hold one expert block of "
                             f"{format_bytes(layout.nbytes)} ({layout.nbytes} bytes)")
        return cls(layout, num_slots, device)

    def slot(self, index: int) -> torch.Tensor:
        """The 1-D block `[N]` of slot `index` (a view of `storage`)."""
        if not 0 <= index < self.num_slots:
            raise IndexError(f"slot {index} out of range 0..{self.num_slots - 1}")
        n = self.layout.numel
        return self.storage[index * n : (index + 1) * n]

    def rows(self, first: int, count: int) -> torch.Tensor:
        """Slots `first .. first + count - 1` as one tensor `[count, N]` (a view)."""
        if count <= 0 or first < 0 or first + count > self.num_slots:
            raise IndexError(f"slots {first}..{first + count - 1} out of range "
                             f"0..{self.num_slots - 1}")
        return self.storage.view(self.num_slots, self.layout.numel)[first : first + count]

    def weights(self, index: int, dtype: torch.dtype | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(gate [I, D], up [I, D], down [D, I])` views of slot `index`; of an FP8 pool, its
        matrices dequantised to `dtype` (new tensors; `dtype` is then required)."""
        return self.layout.matrices(self.slot(index), dtype)

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(gate [S, I, D], up [S, I, D], down [S, D, I])`: every slot's matrices as strided
        views of the one allocation (slot `s` is row `s`), for gathering by slot index."""
        if self._stacked is None:  # built once: the storage never changes
            self._stacked = self.layout.stacked_views(
                self.storage.view(self.num_slots, self.layout.numel))
        return self._stacked

    @property
    def nbytes(self) -> int:
        """Bytes of the whole pool."""
        return self.num_slots * self.layout.nbytes

