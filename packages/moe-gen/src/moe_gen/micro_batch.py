"""One attention micro-batch: its sequences' new tokens padded to a rectangle, their past keys
gathered from the host pages, and the cache object the attention modules write through.

Dimension key: b sequences in the micro-batch, T new tokens (the longest of them), P past
tokens (the longest of them), S = P + T keys, D hidden.

The step's hidden states are packed (`[N, D]`, real tokens only, no padding); a micro-batch
indexes its rows out of them. moe-core's attention modules call `cache.append(layer, *new)`
with `[b, T, ...]` tensors and attend over whatever it returns, so `MicroBatchKV` (a duck-typed
`KVCache`) returns `[b, S, ...]`: the gathered past, then the new entries, which it also writes
back to the host pages. The mask hides padding keys and queries and is built from positions, so
it is right for sliding windows too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from moe_core import position_mask

from moe_gen.kv_mover import KVMover
from moe_gen.paged_kv import PagedKV, table_tensor

__all__ = ["MicroBatch", "MicroBatchKV", "SequenceInput"]


@dataclass(frozen=True)
class SequenceInput:
    """One sequence's part of a step.

    Attributes:
        page_table: Its host KV pages.
        num_past: Tokens already cached.
        token_ids: Its new tokens this step (the prompt at prefill, one token at decode).
        first_row: Row of its first new token in the step's packed hidden states.
    """

    page_table: list[int]
    num_past: int
    token_ids: list[int]
    first_row: int


class MicroBatch:
    """Index tensors, positions and masks of a micro-batch (built on the host, moved once)."""

    def __init__(self, seqs: list[SequenceInput], pages: PagedKV, device: torch.device,
                 attention_device: torch.device | None = None) -> None:
        """Index the packed hidden states on `device`; attend on `attention_device` (default:
        `device`; the CPU for a micro-batch attended on the host).

        Everything is built with a few whole-batch tensor operations on the host and moved
        once: no per-sequence work, and nothing later in the step reads a device tensor back
        (a boolean mask applied on the device would make the host wait for the device).
        """
        attention_device = attention_device or device
        self.attention_device = attention_device
        b = len(seqs)
        t = max(len(s.token_ids) for s in seqs)
        p = max(s.num_past for s in seqs)
        lengths = torch.tensor([len(s.token_ids) for s in seqs])  # [b]
        past = torch.tensor([s.num_past for s in seqs])  # [b]
        steps = torch.arange(t)
        valid = steps[None, :] < lengths[:, None]  # [b, T]
        rows = torch.tensor([s.first_row for s in seqs])[:, None] + steps[None, :]  # [b, T]
        new_pos = past[:, None] + steps[None, :]  # [b, T]
        self.num_past = p
        self.past_lengths = past  # [b] int64, on the host
        self.num_valid = int(valid.sum())
        # Flat [b*T] indices of the real tokens; None when there is no padding (decode).
        self.valid_index = (None if self.num_valid == b * t
                            else valid.flatten().nonzero()[:, 0].to(attention_device))
        self.rows = rows.masked_fill(~valid, 0).to(device)  # padding reads row 0, dropped after
        self.real_rows = rows[valid].to(device)  # [n]
        self.positions = new_pos.to(device)  # [b, T]
        tables = table_tensor([s.page_table for s in seqs])  # [b, W]
        past_pos = torch.arange(p).expand(b, p)  # [b, P]
        past_valid = past_pos < past[:, None]  # [b, P]
        # Padding keys read the sequence's own first slot; the mask hides them.
        self.past_slots = pages.batch_slots(tables, past_pos.masked_fill(~past_valid, 0)
                                            ).flatten()  # [b*P], on the host (the gather index)
        self.new_slots = pages.batch_slots(tables, new_pos.masked_fill(~valid, 0))[valid]  # [n]
        key_pos = torch.cat((past_pos, new_pos), dim=1)  # [b, S]
        self._key_valid = torch.cat((past_valid, valid), dim=1).to(attention_device)  # [b, S]
        self._key_pos = key_pos.to(attention_device)  # [b, S]
        self._query_pos = new_pos.to(attention_device)  # [b, T]
        self.shape = (b, t)

    def take_valid(self, x: torch.Tensor) -> torch.Tensor:
        """The real tokens `[n, ...]` of a padded `[b, T, ...]` tensor, in packed order."""
        flat = x.reshape(-1, *x.shape[2:])  # [b*T, ...]
        return flat if self.valid_index is None else flat.index_select(0, self.valid_index)

    def mask(self, sliding_window: int | None, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask `[b, 1, T, S]`: causal by position, padding hidden, optional window."""
        return position_mask(self._query_pos, self._key_pos, self._key_valid, sliding_window, dtype)


class MicroBatchKV:
    """The duck-typed cache the attention modules of one micro-batch write through."""

    def __init__(self, batch: MicroBatch, pages: PagedKV, mover: KVMover) -> None:
        self.batch = batch
        self.pages = pages
        self.mover = mover

    def append(self, layer: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store the new entries `[b, T, ...]` in the host pages; return `[b, P + T, ...]`."""
        batch = self.batch
        b, _ = batch.shape
        out = []
        for arena, new in zip(self.pages.arenas[layer], tensors, strict=True):
            self.mover.scatter(arena, batch.new_slots, batch.take_valid(new))
            if batch.num_past == 0:
                out.append(new)
                continue
            past = self.mover.gather(arena, batch.past_slots)  # [b*P, ...]
            past = past.view(b, batch.num_past, *new.shape[2:]).to(new.dtype)
            out.append(torch.cat((past, new), dim=1))  # [b, S, ...]
        if batch.num_past:
            self.mover.release()  # the gathered copies are read; their buffers may be reused
        return tuple(out)
