"""Decode passes of the serving engine replayed from CUDA graphs.

Dimension key: b rows (one new token each), P past slots of the pass (its bucket: the most
cached tokens of any row, rounded up to `PAST_BUCKET_TOKENS`), S = P + 1 keys, L MoE layers,
E routed experts, V vocabulary.

Why: an eager pass launches hundreds of small kernels per token, and at batch 1 the host's
launches, not the GPU, set the time per token (decision 0007: 29.6 ms eager against 1.8 ms
captured, all experts resident, S3 shapes). moe-core's `DecodeRunner` captures steps over its
own static cache; the engine's sequences live in the paged KV pool and join and leave the batch
at any step, so it captures its own pass: `run_pass` over a `StaticDecodePass`, whose every
index (token ids, positions, the pool slots each row reads and writes, the mask's inputs) is a
view of one device buffer that the host refills before each replay with one copy. One graph per
(b, P bucket); the tracer's per-row routing counts and lookahead are device buffers written in
the graph (its observers only enqueue device work), which the engine reads back after each
replay (`PassReadback`). The token ids can come from a device tensor instead of the host (the
previous pass's tokens, chosen on the device), so the engine can enqueue the next replay before
it has read the previous one's tokens (docs/decisions/0017).

A pass is captured only where every MoE executor runs it on the device (its token limit:
the mapped fetch up to a few tokens; above that the copy path reads the routing on the host),
on one process (expert-parallel ranks run eagerly), and on CUDA. Everything else, and a pass
whose capture failed, runs eagerly as before: the caller gets None.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from moe_core import CaptureContext, MoEForCausalLM

from moe_infinity.serving.kv_pool import KVPool
from moe_infinity.serving.live_tracer import LiveTracer
from moe_infinity.serving.ragged_pass import PassIndices, PassRow
from moe_infinity.serving.step_pass import run_pass

__all__ = ["PAST_BUCKET_TOKENS", "CapturedDecode", "StaticDecodePass", "captured_decode_blocker"]

PAST_BUCKET_TOKENS = 256
"""Past slots are read in buckets of this many (a pass reads up to this many unused slots, and a
sequence needs a new graph every this many tokens)."""
MAX_GRAPHS = 12
"""Graphs kept (least recently replayed dropped first)."""

_log = logging.getLogger("moe_infinity.captured_decode")


def captured_decode_blocker(model: MoEForCausalLM) -> str | None:
    """Why the engine's decode passes cannot be captured for `model`, or None. (The engine's
    own tracer observes every pass; its observers only enqueue device work, so they are
    captured with the pass, unlike moe-core's `graph_blockers`, which refuses any observer.)"""
    if model.device.type != "cuda":
        return f"the model is on {model.device.type}, not CUDA"
    for block in model.moe_blocks():
        if not getattr(block.executor, "graph_safe", False):
            return (f"layer {block.layer}'s expert executor ({type(block.executor).__name__}) "
                    "reads its routing on the host; --fetch mapped keeps it on the device")
    return None


class StaticDecodePass(PassIndices):
    """A decode pass (`b` rows, one new token each, `P` past slots) over static device buffers:
    the `RaggedPass` interface `run_pass` and `PooledKV` use, every index a view of `buffer`.

    Attributes:
        buffer: `[b * (3 + 2 * S) + b * P]` int64 on the device, refilled by `fill`.
        input_ids: `[b, 1]`.
        positions: `[b, 1]` each new token's position.
        last: `[b]` zeros (each row's only token).
        num_cached: P.
        num_rows: b.
        num_tokens: b.
        row_of_token: `[b]` 0..b-1.
    """

    def __init__(self, rows: int, past: int, pool: KVPool, device: torch.device) -> None:
        b, s = rows, past + 1
        self.num_rows = self.num_tokens = b
        self.num_cached = past
        self._pool = pool
        self._sizes = (b, b, b, b * s, b * s, b * past)  # the six fields, in order
        self.buffer = torch.zeros(sum(self._sizes), dtype=torch.long, device=device)
        self._host = torch.zeros(sum(self._sizes), dtype=torch.long,
                                 pin_memory=device.type == "cuda")
        # The same fields as numpy views of the host buffer (writing one element costs ~0.1 us
        # there against ~2 us through a tensor): ids, positions, new slots [b]; key positions,
        # key validity [b, S]; past slots [b, P].
        fields = np.split(self._host.numpy(), np.cumsum(self._sizes)[:-1])
        self._host_fields = (*fields[:3], fields[3].reshape(b, s), fields[4].reshape(b, s),
                             fields[5].reshape(b, past))
        self._filled: list[tuple[list[int], int]] | None = None  # (table, cached) per row
        self._copied: torch.cuda.Event | None = None  # the end of the latest fill's copy
        ids, positions, new_slots, key_pos, key_valid, past_slots = self.buffer.split(self._sizes)
        self.input_ids = ids.view(b, 1)
        self.positions = positions.view(b, 1)
        self._new_slots = new_slots
        self._key_pos = key_pos.view(b, s)
        self._key_valid = key_valid.view(b, s)
        self._past_slots = past_slots
        self.last = torch.zeros(b, dtype=torch.long, device=device)
        self.row_of_token = torch.arange(b, device=device)

    def fill(self, rows: list[PassRow], input_ids: torch.Tensor | None = None) -> None:
        """Write this pass's rows (each one new token, at most P cached) into the buffer: one
        host-to-device copy, ordered on the current stream before the replay. Where the rows
        are those of the previous fill, each one token further (a decode stream's next step),
        only what that token changes is written (`_advance`).

        `input_ids` `[b]` on the device, where given, replaces the rows' token ids: a copy on
        the stream after the fill's, so the pass reads tokens the host has not read yet (the
        previous pass's, chosen on the device)."""
        if self._copied is not None:  # the previous fill's copy may not have read the host
            self._copied.synchronize()  # buffer yet when its pass was enqueued ahead
        if not self._advance(rows):
            self._fill_all(rows)
        self._filled = [(r.table, r.num_cached) for r in rows]
        self.buffer.copy_(self._host, non_blocking=True)
        if self.buffer.is_cuda:
            if self._copied is None:
                self._copied = torch.cuda.Event()
            self._copied.record(torch.cuda.current_stream(self.buffer.device))
        if input_ids is not None:
            self.input_ids.copy_(input_ids.view(self.num_rows, 1))

    def _fill_all(self, rows: list[PassRow]) -> None:
        b, p = self.num_rows, self.num_cached
        cached = torch.tensor([r.num_cached for r in rows])  # [b]
        past_pos = torch.arange(p).expand(b, p)  # [b, P]
        past_valid = past_pos < cached[:, None]  # [b, P]
        tables = [r.table for r in rows]
        ids, positions, new_slots, key_pos, key_valid, past_slots = self._host.split(self._sizes)
        ids.copy_(torch.tensor([r.token_ids[0] for r in rows]))
        positions.copy_(cached)
        new_slots.copy_(self._pool.slots(tables, cached[:, None]).view(-1))
        key_pos.view(b, p + 1).copy_(torch.cat((past_pos, cached[:, None]), dim=1))
        key_valid.view(b, p + 1).copy_(torch.cat(
            (past_valid, torch.ones(b, 1, dtype=torch.bool)), dim=1))
        # Padding keys read the row's own first slot; the mask hides them.
        past_slots.copy_(self._pool.slots(tables, past_pos.masked_fill(~past_valid, 0)).view(-1))

    def _advance(self, rows: list[PassRow]) -> bool:
        """Update the host buffer in place where every row is the previous fill's, one token
        further (same table, one more cached); False (nothing written) otherwise. Row i's
        token at position c gets its id, position, slot and last key; its previous token
        (c - 1, now cached) turns a padding key of the past into a real one."""
        filled = self._filled
        if filled is None or len(filled) != len(rows) or any(
                r.num_cached != c + 1 or r.table != t for r, (t, c) in zip(rows, filled,
                                                                            strict=True)):
            return False
        ids, positions, new_slots, key_pos, key_valid, past_slots = self._host_fields
        p, block = self.num_cached, self._pool.block_tokens
        for i, row in enumerate(rows):
            c = row.num_cached
            ids[i] = row.token_ids[0]
            positions[i] = key_pos[i, p] = c
            new_slots[i] = row.table[c // block] * block + c % block
            key_valid[i, c - 1] = 1
            past_slots[i, c - 1] = row.table[(c - 1) // block] * block + (c - 1) % block
        return True

    # The RaggedPass interface ------------------------------------------------------------------

    def take_valid(self, x: torch.Tensor) -> torch.Tensor:
        """`[b, 1, ...]` as `[b, ...]` (every token is real)."""
        return x.reshape(-1, *x.shape[2:])

    def put_valid(self, values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """`values` `[b, ...]` shaped as `like` `[b, 1, ...]`."""
        return values.to(like.dtype).view(like.shape)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    batch: StaticDecodePass
    logits: torch.Tensor  # [b, V]
    counts: torch.Tensor  # [b, L, E]
    looks: torch.Tensor  # [b, L, E]


class CapturedDecode:
    """The engine's decode passes as CUDA graphs (see the module docstring).

    Attributes:
        model: The served model.
        pool: The engine's KV pool.
        tracer: The engine's tracer (attached: its observers are captured with the pass).
        captures: Graphs captured so far.
        failures: Captures that failed (their shapes then run eagerly).
    """

    def __init__(self, model: MoEForCausalLM, pool: KVPool, tracer: LiveTracer) -> None:
        if tracer.chains_other_observers:
            raise ValueError("the tracer chains observers other than its own: their host code "
                             "would run once, at capture")
        self.model = model
        self.pool = pool
        self.tracer = tracer
        self.captures = 0
        self.failures = 0
        self._graphs: OrderedDict[tuple[int, int], _Graph] = OrderedDict()
        self._failed: set[tuple[int, int]] = set()
        self._mempool = torch.cuda.graph_pool_handle()
        self._context = CaptureContext(model)

    def launch(self, rows: list[PassRow], input_ids: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Enqueue the replay of a decode pass over `rows` (each one new token; its graph is
        captured on first use); None where this pass runs eagerly. `input_ids` `[b]` on the
        device, where given, replaces the rows' token ids (`StaticDecodePass.fill`).

        Returns the graph's outputs, `(logits [b, V] float32, counts [b, L, E] int32,
        lookahead [b, L, E] float32)` on the device, written when the replay has run: static
        buffers, which the next replay of the same shape overwrites, so whatever reads them is
        enqueued before that replay."""
        if any(len(r.token_ids) != 1 for r in rows):
            return None
        self._check_model()
        b = len(rows)
        if b > self._context.token_limit:
            return None
        most = max(r.num_cached for r in rows)
        past = max(PAST_BUCKET_TOKENS, -(-most // PAST_BUCKET_TOKENS) * PAST_BUCKET_TOKENS)
        key = (b, past)
        if key in self._failed:
            return None
        captured = self._graphs.get(key)
        if captured is None:
            captured = self._capture(key, rows, input_ids)
            if captured is None:
                return None
        self._graphs.move_to_end(key)
        captured.batch.fill(rows, input_ids)
        self._context.replay(captured.graph, b)
        return captured.logits, captured.counts, captured.looks

    def _check_model(self) -> None:
        """Forget every graph if the model's MoE blocks changed since they were captured."""
        if self._context.changed():
            self._graphs.clear()
            self._failed.clear()

    def _capture(self, key: tuple[int, int], rows: list[PassRow],
                 input_ids: torch.Tensor | None) -> _Graph | None:
        """Warm the pass up eagerly on a side stream (twice: lazy allocations, compiled kernels;
        the KV it writes is the same token's, rewritten by the replay), then capture it."""
        b, past = key
        device = self.model.device
        batch = StaticDecodePass(b, past, self.pool, device)
        batch.fill(rows, input_ids)
        tracer = self.tracer

        def warm_pass() -> None:
            tracer.begin_pass(batch.row_of_token, b)
            run_pass(self.model, batch, self.pool)  # type: ignore[arg-type]
            tracer.drop_pass()

        self._context.warm_up(warm_pass)
        if len(self._graphs) >= MAX_GRAPHS:
            self._graphs.popitem(last=False)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._mempool):
                tracer.begin_pass(batch.row_of_token, b)
                logits = run_pass(self.model, batch, self.pool)  # type: ignore[arg-type]
                counts, looks = tracer.drop_pass()
        except RuntimeError as exc:
            with contextlib.suppress(RuntimeError):  # the pass may have ended already
                tracer.drop_pass()
            self._failed.add(key)
            self.failures += 1
            _log.warning("decode pass of %d rows x %d past slots not captured, running it "
                         "eagerly: %s", b, past, str(exc).splitlines()[0][:200])
            return None
        self.captures += 1
        captured = self._graphs[key] = _Graph(graph, batch, logits, counts, looks)
        _log.info("captured the decode pass of %d rows x %d past slots", b, past)
        return captured

