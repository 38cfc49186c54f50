"""Enqueueing the engine's passes: a decode pass replayed from its CUDA graph where one is
captured, every other pass run eagerly (on every rank, with expert parallelism).

Dimension key: b rows of a pass, L MoE layers, E routed experts, V vocabulary.

A launched pass's results stay on the device (`LaunchedPass`): the engine chooses the next
tokens there and reads everything with one copy (`PassReadback`), possibly after it has
enqueued the next decode pass on those tokens (docs/decisions/0017). On the CPU a pass is run,
not enqueued, so the same code is simply synchronous.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from moe_core import MoEForCausalLM

from moe_infinity.serving.captured_decode import CapturedDecode
from moe_infinity.serving.decode_passes import DecodePasses
from moe_infinity.serving.followers import PassFollowers
from moe_infinity.serving.kv_pool import KVPool
from moe_infinity.serving.live_tracer import LiveTracer
from moe_infinity.serving.ragged_pass import PassRow, RaggedPass
from moe_infinity.serving.sequence import Sequence
from moe_infinity.serving.step_pass import run_pass

__all__ = ["LaunchedPass", "PassLauncher"]


@dataclass(frozen=True)
class LaunchedPass:
    """A pass enqueued on the device, its results not yet read by the host.

    Attributes:
        seqs: The sequence of each row, in order (one may have ended since).
        num_tokens: Each row's new tokens.
        prefill: Whether the rows are prompt chunks (else one decode token each).
        logits: `[b, V]` float32 at each row's last new token (a captured pass's are the
            graph's buffer: read them before its next replay).
        counts: `[b, L, E]` int32 tokens of each row routed to each expert.
        looks: `[b, L, E]` float32 lookahead of each row.
    """

    seqs: list[Sequence]
    num_tokens: list[int]
    prefill: bool
    logits: torch.Tensor
    counts: torch.Tensor
    looks: torch.Tensor

    @property
    def live_seqs(self) -> list[Sequence]:
        """The rows' sequences that have not ended."""
        return [s for s in self.seqs if not s.is_finished]


class PassLauncher:
    """Enqueues passes over the engine's KV pool, traced row by row.

    Attributes:
        model: The served model.
        pool: The engine's KV pool.
        tracer: The engine's tracer (attached).
        captured: The captured decode passes, or None (every pass eager).
        followers: The other ranks of an expert-parallel server, or None.
    """

    def __init__(self, model: MoEForCausalLM, pool: KVPool, tracer: LiveTracer,
                 captured: CapturedDecode | None, followers: PassFollowers | None) -> None:
        self.model = model
        self.pool = pool
        self.tracer = tracer
        self.captured = captured
        self.followers = followers
        self._decode_passes = DecodePasses(pool)  # eager decode passes' kept slots

    def launch(self, seqs: list[Sequence], rows: list[PassRow], prefill: bool,
               input_ids: torch.Tensor | None = None) -> LaunchedPass:
        """Enqueue the pass over `rows` (those of `seqs`): prompt chunks, or one decode token
        each. `input_ids` `[b]` on the device, where given, replaces the decode rows' token ids
        (the previous pass's tokens, not read by the host yet).

        Raises:
            ValueError: `input_ids` for a prefill pass, or with expert-parallel ranks (they
                receive the rows' token ids from the host).
        """
        if input_ids is not None and (prefill or self.followers is not None):
            raise ValueError("device token ids are for one process's decode passes only")
        replayed = None
        if not prefill and self.captured is not None:
            replayed = self.captured.launch(rows, input_ids)
        if replayed is not None:
            logits, counts, looks = replayed
        else:
            logits, counts, looks = self._run_eagerly(rows, prefill, input_ids)
        return LaunchedPass(seqs, [len(r.token_ids) for r in rows], prefill, logits, counts,
                            looks)

    def _run_eagerly(self, rows: list[PassRow], prefill: bool, input_ids: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(logits [b, V], counts, lookahead [b, L, E])` of the pass run eagerly."""
        model, device = self.model, self.model.device
        batch = (RaggedPass(rows, self.pool, device) if prefill
                 else self._decode_passes.build(rows, device))
        if input_ids is not None:
            batch.input_ids = input_ids.view(batch.num_rows, 1)  # [b, 1]
        self.tracer.begin_pass(batch.row_of_token, batch.num_rows)
        if self.followers is None:
            logits = run_pass(model, batch, self.pool)  # [b, V]
        else:  # every rank runs the pass (each its own experts), this one samples
            logits = self.followers.run(rows, lambda: run_pass(model, batch, self.pool))
        counts, looks = self.tracer.drop_pass()
        return logits, counts, looks
