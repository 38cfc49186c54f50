"""The generation loop: schedule a step, run it, pick each sequence's next token, retire the
sequences that stopped (EOS, their limit, or a stop string) and hand their results on."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from moe_core import sample_next

from moe_gen.engine import BatchEngine, StepTiming
from moe_gen.expert_usage import ExpertUsage
from moe_gen.host_share_trial import HostShareTrial
from moe_gen.micro_batch import SequenceInput
from moe_gen.scheduler import Scheduler
from moe_gen.sequence import FinishReason, GenResult, Sequence

__all__ = ["StepStats", "run_loop"]

Decode = Callable[[list[int]], str]


@dataclass(frozen=True)
class StepStats:
    """One step as the run record and the progress bar see it.

    Attributes:
        phase: `"prefill"` when the step ran any prompt, else `"decode"`.
        seconds: Wall time.
        chunks: `(past_tokens, new_tokens)` per sequence.
        h2d_bytes: Host-to-device bytes (experts and KV).
        attention_s: Attention share of the step.
        moe_s: MoE share of the step.
        experts_activated: Distinct routed experts each MoE layer used (measured; None: not
            measured).
        host_share: Share of its decode sequences the host attended.
    """

    phase: str
    seconds: float
    chunks: tuple[tuple[int, int], ...]
    h2d_bytes: int
    attention_s: float
    moe_s: float
    experts_activated: tuple[int, ...] | None = None
    host_share: float = 0.0

    def to_dict(self) -> dict[str, object]:
        """JSON-ready (an engine on Ray sends its steps to the job this way)."""
        return {"phase": self.phase, "seconds": self.seconds,
                "chunks": [list(c) for c in self.chunks], "h2d_bytes": self.h2d_bytes,
                "attention_s": self.attention_s, "moe_s": self.moe_s,
                "experts_activated": (None if self.experts_activated is None
                                      else list(self.experts_activated)),
                "host_share": self.host_share}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> StepStats:
        """The step `to_dict` wrote."""
        fields: dict[str, Any] = data  # our own JSON: the types `to_dict` wrote
        experts = fields["experts_activated"]
        return cls(fields["phase"], fields["seconds"],
                   tuple((p, n) for p, n in fields["chunks"]), fields["h2d_bytes"],
                   fields["attention_s"], fields["moe_s"],
                   None if experts is None else tuple(experts),
                   float(fields.get("host_share", 0.0)))


def _inputs(seqs: list[Sequence]) -> list[SequenceInput]:
    out, row = [], 0
    for s in seqs:
        out.append(SequenceInput(s.page_table, s.num_cached, s.pending, row))
        row += len(s.pending)
    return out


def _next_tokens(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """Greedy rows in one argmax; sampled rows each with their own generator."""
    tokens = logits.argmax(dim=-1).tolist()  # [n]
    for i, seq in enumerate(seqs):
        if not seq.sampling.is_greedy:
            tokens[i] = int(sample_next(logits[i : i + 1], seq.sampling, seq.generator)[0])
    return tokens


def _finish(seq: Sequence, token: int, eos_ids: set[int], decode: Decode | None
            ) -> tuple[FinishReason | None, str | None]:
    """Why `seq` stops after `token` (None: it goes on), and its text so far if decoded."""
    if token in eos_ids:
        return "eos", None
    if seq.stop and decode is not None:
        text = decode(seq.output_ids)
        if any(s in text for s in seq.stop):
            return "stop", text
    if len(seq.output_ids) >= seq.max_new_tokens:
        return "length", None
    return None, None


def _result(seq: Sequence, reason: FinishReason, decode: Decode | None) -> GenResult:
    text = decode(seq.output_ids) if decode is not None else None
    if reason == "stop" and text is not None:
        cut = min(text.index(s) for s in seq.stop if s in text)
        text = text[:cut]
    return GenResult(seq.id, seq.index, text, tuple(seq.output_ids), len(seq.prompt_ids), reason)


def run_loop(engine: BatchEngine, scheduler: Scheduler, eos_ids: set[int],
             decode: Decode | None, on_result: Callable[[GenResult], None],
             on_step: Callable[[StepStats], None], h2d_bytes: Callable[[], int],
             usage: ExpertUsage | None = None, trial: HostShareTrial | None = None) -> None:
    """Run every queued sequence to its end.

    Args:
        engine: Runs steps.
        scheduler: Holds the queue and the running batch.
        eos_ids: Tokens that end a sequence.
        decode: Token ids to text (for stop strings and results), or None.
        on_result: Called with each finished sequence's result, as it finishes.
        on_step: Called after each step.
        h2d_bytes: Host-to-device bytes moved so far (all copies), for per-step accounting.
        usage: Measures the experts each step used (None: not measured).
        trial: Checks the engine's host share against none on the first decode steps and
            keeps the faster (`host_share_trial`; None: the share stays).
    """
    while not scheduler.is_done:
        seqs = scheduler.next_step()
        phase = "prefill" if any(s.num_cached == 0 for s in seqs) else "decode"
        if trial is not None:
            engine.set_host_share(trial.share(len(seqs), phase == "decode"))
        share = engine.host_share
        before = h2d_bytes()
        timing = StepTiming()
        logits = engine.step(_inputs(seqs), timing)  # [n, V]
        if trial is not None:
            trial.record(share, len(seqs), phase == "decode", timing.total_s)
        chunks = tuple((s.num_cached, len(s.pending)) for s in seqs)
        for seq, token in zip(seqs, _next_tokens(logits, seqs), strict=True):
            seq.num_cached += len(seq.pending)
            seq.output_ids.append(token)
            reason, _ = _finish(seq, token, eos_ids, decode)
            if reason is None:
                seq.pending = [token]
                continue
            scheduler.retire(seq)
            on_result(_result(seq, reason, decode))
        on_step(StepStats(phase, timing.total_s, chunks, h2d_bytes() - before,
                          timing.attention_s, timing.moe_s,
                          usage.take() if usage is not None else None, share))
