"""One forward pass over a ragged batch: each row its own sequence, its own cached length and its
own number of new tokens, over the KV pool.

Dimension key: b rows, T new tokens (the most of any row), P cached tokens (the most of any
row), S = P + T keys, n real new tokens.

Rows are sequences in any state: a prompt chunk being prefilled (many new tokens after some
cached ones) or a decode step (one new token after all the others). Positions, masks and slots
are built per row from its own length, so rows never share a slot axis and a request can join
or leave the batch at any step. The attention layers call `PooledKV.append` with `[b, T, ...]`
entries: it writes the real ones into the pool and returns `[b, S, ...]` (each row's cached
entries gathered from its blocks, then the new ones). The mask is causal by position and hides
padding, as in moe-gen's micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from moe_core import AttentionInputs, MoEForCausalLM, position_mask

from moe_infinity.serving.kv_pool import KVPool

__all__ = ["PassIndices", "PassRow", "PooledKV", "RaggedPass"]


@dataclass(frozen=True)
class PassRow:
    """One sequence's part of a pass.

    Attributes:
        table: Its KV blocks.
        num_cached: Its tokens already in the pool.
        token_ids: Its new tokens (a prompt chunk, or the one token being decoded).
    """

    table: list[int]
    num_cached: int
    token_ids: list[int]


class PassIndices:
    """What a pass's attention reads from its indices (shared by `RaggedPass` and the captured
    decode's static pass): the mask, the rotary tables, the gather of each row's past slots and
    the scatter of its new entries. Subclasses set `positions` `[b, T]`, `_key_pos` and
    `_key_valid` `[b, S]`, `_past_slots` `[b*P]`, `_new_slots` `[n]`, `num_rows`, `num_tokens`,
    `num_cached` and `take_valid`."""

    positions: torch.Tensor
    num_rows: int
    num_tokens: int
    num_cached: int
    _key_pos: torch.Tensor
    _key_valid: torch.Tensor
    _past_slots: torch.Tensor
    _new_slots: torch.Tensor

    def take_valid(self, x: torch.Tensor) -> torch.Tensor:
        """The real tokens `[n, ...]` of a padded `[b, T, ...]` tensor, row by row."""
        raise NotImplementedError

    def mask(self, sliding_window: int | None, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask `[b, 1, T, S]`: causal by position, padding hidden, optional window."""
        return position_mask(self.positions, self._key_pos, self._key_valid.bool(),
                             sliding_window, dtype)

    def attention_inputs(self, model: MoEForCausalLM, dtype: torch.dtype) -> AttentionInputs:
        """Rotary tables and masks of this pass for `model`."""
        spec = model.spec
        window = (self.mask(spec.attention.sliding_window, dtype) if spec.sliding_layers
                  else None)
        return AttentionInputs(model.rope(self.positions, dtype), self.mask(None, dtype), window)

    def gather_past(self, arena: torch.Tensor) -> torch.Tensor:
        """Each row's cached entries `[b, P, ...]` from one arena."""
        return arena.index_select(0, self._past_slots).view(
            self.num_rows, self.num_cached, *arena.shape[1:])

    def scatter_new(self, arena: torch.Tensor, new: torch.Tensor) -> None:
        """Write the real entries of `new` `[b, T, ...]` into their slots of `arena`."""
        arena.index_copy_(0, self._new_slots, self.take_valid(new).to(arena.dtype))

    def new_slots(self) -> torch.Tensor:
        """The pool slot of each real new token `[n]` (a decode pass: one per row)."""
        return self._new_slots

    def key_slots(self) -> torch.Tensor:
        """A decode pass's keys `[b, S]` as pool slots: each row's past (padding reads its
        first slot; the mask hides it), then its new token. One new token per row only."""
        if self.num_tokens != self.num_rows:
            raise ValueError("key_slots is for decode passes (one new token per row)")
        return torch.cat((self._past_slots.view(self.num_rows, self.num_cached),
                          self._new_slots.view(self.num_rows, 1)), dim=1)


class RaggedPass(PassIndices):
    """Token ids, positions, masks and KV slots of one pass (built on the host, moved once).

    Attributes:
        input_ids: `[b, T]` new tokens, right-padded with 0.
        valid: `[b, T]` which of them are real.
        positions: `[b, T]` each token's position in its sequence.
        last: `[b]` index (in T) of each row's last new token: where its next-token logits are.
        num_cached: P.
    """

    def __init__(self, rows: list[PassRow], pool: KVPool, device: torch.device) -> None:
        if not rows or any(not r.token_ids for r in rows):
            raise ValueError("a pass needs at least one row, each with at least one new token")
        b = len(rows)
        t = max(len(r.token_ids) for r in rows)
        p = max(r.num_cached for r in rows)
        lengths = torch.tensor([len(r.token_ids) for r in rows])  # [b]
        cached = torch.tensor([r.num_cached for r in rows])  # [b]
        steps = torch.arange(t)
        valid = steps[None, :] < lengths[:, None]  # [b, T]
        ids = torch.zeros((b, t), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row.token_ids)] = torch.tensor(row.token_ids, dtype=torch.long)
        new_pos = cached[:, None] + steps[None, :]  # [b, T]
        past_pos = torch.arange(p).expand(b, p)  # [b, P]
        past_valid = past_pos < cached[:, None]  # [b, P]
        tables = [r.table for r in rows]
        # Padding keys read the row's own first slot; the mask hides them.
        self._past_slots = pool.slots(tables, past_pos.masked_fill(~past_valid, 0)
                                      ).flatten().to(device)  # [b*P]
        self._new_slots = pool.slots(tables, new_pos.masked_fill(~valid, 0))[valid].to(device)
        self._valid_index = valid.flatten().nonzero()[:, 0].to(device)  # [n]
        key_pos = torch.cat((past_pos, new_pos), dim=1)  # [b, S]
        self._key_valid = torch.cat((past_valid, valid), dim=1).to(device)  # [b, S]
        self._key_pos = key_pos.to(device)
        self.input_ids = ids.to(device)
        self.valid = valid.to(device)
        self.positions = new_pos.to(device)
        self.last = (lengths - 1).to(device)
        self.num_cached = p
        self.num_rows = b
        self.num_tokens = int(lengths.sum())
        self.row_of_token = torch.arange(b).repeat_interleave(lengths).to(device)  # [n]

    def take_valid(self, x: torch.Tensor) -> torch.Tensor:
        """The real tokens `[n, ...]` of a padded `[b, T, ...]` tensor, row by row."""
        return x.reshape(-1, *x.shape[2:]).index_select(0, self._valid_index)

    def put_valid(self, values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A zero `[b, T, ...]` tensor shaped as `like`, with the real tokens set to `values`."""
        out = torch.zeros_like(like)
        flat = out.view(-1, *out.shape[2:])
        flat.index_copy_(0, self._valid_index, values.to(out.dtype))
        return out


class PooledKV:
    """The `moe_core.KVStore` the attention layers of one `RaggedPass` write through.

    Decode passes (one new token per row) also let moe-core's fused decode kernels write and
    read the pool in place (`write_target`, `key_slots`): the new key and value go straight to
    their slots and attention reads each row's keys where they lie, with no gather of the past
    and no concatenation (the serving pass's attention had ~270 us of those per step on the
    H200 at S3, against the decode runner's fused step).
    """

    def __init__(self, batch: PassIndices, pool: KVPool) -> None:
        self.batch = batch
        self.pool = pool
        self._key_slots: torch.Tensor | None = None

    def write_target(self, layer: int, tails: tuple[tuple[int, ...], ...], dtype: torch.dtype
                     ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """For kernels that write a decode pass's new entries themselves
        (`moe_core.kernels.qkv_rope_store`): the layer's arenas as one shared pool row
        `[1, N, *tail]` and each row's slot `[b]`.

        Raises:
            ValueError: the arenas do not hold entries of `tails` in `dtype`.
        """
        arenas = self.pool.arenas[layer]
        if len(arenas) != len(tails) or any(
                a.dtype != dtype or tuple(a.shape[1:]) != tuple(t)
                for a, t in zip(arenas, tails, strict=False)):
            raise ValueError(f"layer {layer}'s KV arenas "
                             f"{[(tuple(a.shape[1:]), a.dtype) for a in arenas]} do not hold "
                             f"entries {tails} of {dtype}")
        return tuple(a.unsqueeze(0) for a in arenas), self.batch.new_slots()

    @property
    def key_slots(self) -> torch.Tensor:
        """`[b, S]` the pool slots each row of a decode pass attends (its past, then its new
        token), in the mask's key order; made once per pass."""
        if self._key_slots is None:
            self._key_slots = self.batch.key_slots()
        return self._key_slots

    def append(self, layer: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store the new entries `[b, T, ...]` in the pool; return `[b, P + T, ...]`."""
        out = []
        for arena, new in zip(self.pool.arenas[layer], tensors, strict=True):
            self.batch.scatter_new(arena, new)
            if self.batch.num_cached == 0:
                out.append(new)
            else:
                past = self.batch.gather_past(arena).to(new.dtype)
                out.append(torch.cat((past, new), dim=1))  # [b, S, ...]
        return tuple(out)
