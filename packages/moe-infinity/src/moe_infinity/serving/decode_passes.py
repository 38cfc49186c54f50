"""The engine's eager decode passes (every row one new token), built from slots kept per table.

Dimension key: b rows, P cached tokens (the most of any row), S = P + 1 keys, W blocks of a
table, K tokens per block.

A `RaggedPass` builds every index from the rows' block tables at each step: the pool slot of
every cached position of every row (a Python list of lists made a tensor, a gather, the
arithmetic) and the masks, ~25 tensor operations, 0.4 ms of host time per step at batch 1 on
a slow CPU. Between two decode steps of the same requests only the positions advance, and a
sequence's table is fixed from admission to its end (the KV pool reserves the prompt and its
token limit up front), so the slots of all its positions are computed once, when its table
first decodes, and each step takes a prefix of them. The tensors are those `RaggedPass` builds
for the same rows, value for value (tested), so the pass computes the same numbers.

This serves passes that run eagerly (the CPU, `--no-graphs`, expert-parallel ranks); replayed
passes update their static buffers in place instead (`StaticDecodePass.fill`).
"""

from __future__ import annotations

import torch

from moe_infinity.serving.kv_pool import KVPool
from moe_infinity.serving.ragged_pass import PassRow, RaggedPass

__all__ = ["DecodePasses"]


class DecodePasses:
    """Builds decode passes, keeping the slot tensors of the tables in the latest one."""

    def __init__(self, pool: KVPool) -> None:
        self.pool = pool
        self._slots: dict[tuple[int, ...], torch.Tensor] = {}  # table -> [W * K] slots
        self._steps = torch.arange(0)  # 0, 1, ... (grown as needed)

    def build(self, rows: list[PassRow], device: torch.device) -> RaggedPass:
        """The pass over `rows`: `RaggedPass(rows, pool, device)`'s tensors, built from kept
        slots where every row has one new token (else a `RaggedPass`)."""
        if not rows or any(len(r.token_ids) != 1 for r in rows):
            return RaggedPass(rows, self.pool, device)
        p = max(r.num_cached for r in rows)
        return _DecodePass(rows, self._table_slots(rows), self._arange(p), device)

    def _table_slots(self, rows: list[PassRow]) -> list[torch.Tensor]:
        """Each row's slot of every position its table holds; the kept ones reused, those of
        tables no longer in the pass dropped."""
        block = self.pool.block_tokens
        kept, self._slots = self._slots, {}
        out = []
        for row in rows:
            key = tuple(row.table)
            slots = kept.get(key)
            if slots is None:
                blocks = torch.tensor(row.table, dtype=torch.long)  # [W]
                slots = (blocks[:, None] * block + torch.arange(block)).flatten()  # [W * K]
            self._slots[key] = slots
            out.append(slots)
        return out

    def _arange(self, n: int) -> torch.Tensor:
        """`[n]` 0..n-1, a view of one tensor grown by doubling."""
        if self._steps.numel() < n:
            self._steps = torch.arange(max(n, 2 * self._steps.numel()))
        return self._steps[:n]



class _DecodePass(RaggedPass):
    """A `RaggedPass` of decode rows from their tables' kept slots (`DecodePasses.build`);
    it sets every field itself, so `RaggedPass.__init__`, which builds them from the tables,
    is not called."""

    def __init__(self, rows: list[PassRow], slots: list[torch.Tensor], steps: torch.Tensor,
                 device: torch.device) -> None:
        b, p = len(rows), steps.numel()
        cached_list = [r.num_cached for r in rows]
        cached = torch.tensor(cached_list)  # [b]
        past_pos = steps.expand(b, p)  # [b, P]
        past_valid = past_pos < cached[:, None]  # [b, P]
        if b == 1:  # no padding: the row's first P slots, a view
            past_slots = slots[0][:p]
        else:  # padding keys read the row's own first slot; the mask hides them
            past_slots = torch.stack([s[:p] if c == p else torch.cat((s[:c], s[:1].expand(p - c)))
                                      for s, c in zip(slots, cached_list, strict=True)])
        valid = torch.ones((b, 1), dtype=torch.bool)  # [b, T = 1]
        new_pos = cached[:, None]  # [b, 1]
        self._past_slots = past_slots.flatten().to(device)  # [b*P]
        self._new_slots = torch.stack([s[c] for s, c in zip(slots, cached_list, strict=True)]
                                      ).to(device)  # [b]
        self._valid_index = torch.arange(b).to(device)  # [n = b]
        self._key_valid = torch.cat((past_valid, valid), dim=1).to(device)  # [b, S]
        self._key_pos = torch.cat((past_pos, new_pos), dim=1).to(device)  # [b, S]
        self.input_ids = torch.tensor([r.token_ids for r in rows], dtype=torch.long
                                      ).to(device)  # [b, 1]
        self.valid = valid.to(device)
        self.positions = new_pos.to(device)
        self.last = torch.zeros(b, dtype=torch.long).to(device)
        self.num_cached = p
        self.num_rows = self.num_tokens = b
        self.row_of_token = torch.arange(b).to(device)  # [n]
