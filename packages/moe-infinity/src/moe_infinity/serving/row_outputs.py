"""What becomes of each row's results once the engine has read its pass: the step's host work.

Dimension key: L MoE layers, E routed experts, V vocabulary.

A row's routing joins its request's trace (`TraceRecorder`) and the activation feed. A row with
a next token streams it (`TextStream`: text a few tokens at a time, held back while it may start
a stop string) or ends its request: an end-of-sequence token, a stop string, the token limit.
An ended request leaves the scheduler (its KV blocks freed) and its EAM joins the trace
collection. All of it runs on the engine thread; where the next decode pass was enqueued ahead
it runs while that pass computes (docs/decisions/0017).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from moe_core import MoEError

from moe_infinity.serving.activation_feed import ActivationFeed
from moe_infinity.serving.engine_listener import EngineListener
from moe_infinity.serving.request import FinishReason, TokenLogprob
from moe_infinity.serving.scheduler import Scheduler
from moe_infinity.serving.sequence import Sequence
from moe_infinity.serving.serving_model import ServingModel
from moe_infinity.serving.trace_keeper import TraceKeeper
from moe_infinity.serving.trace_recorder import TraceRecorder

__all__ = ["RowOutputs"]

_log = logging.getLogger("moe_infinity.engine")


class RowOutputs:
    """Traces, the activation feed, streamed tokens and finished requests.

    Attributes:
        scheduler: The engine's scheduler (an ended request leaves it).
        keeper: The trace collection (each ended request's EAM).
        feed: The activation-aware policy's feed, or None.
        listener: Told of first tokens, later tokens and finished requests.
        lookahead_top: Experts kept per step and layer in a trace's lookahead.
    """

    def __init__(self, served: ServingModel, scheduler: Scheduler, keeper: TraceKeeper,
                 feed: ActivationFeed | None, listener: EngineListener,
                 lookahead_top: int) -> None:
        self.scheduler = scheduler
        self.keeper = keeper
        self.feed = feed
        self.listener = listener
        self.lookahead_top = lookahead_top
        self._shape = served.shape
        self._eos = _eos_ids(served)
        self._recorders: dict[str, TraceRecorder] = {}

    def record(self, seq: Sequence, counts: np.ndarray, looks: np.ndarray, num_tokens: int,
               prefill: bool) -> None:
        """A row's routing in one pass, `counts` and lookahead `looks` `[L, E]` over its
        `num_tokens` new tokens (a prompt chunk, or one decode token)."""
        recorder = self._recorders.get(seq.request_id)
        if recorder is None:
            recorder = self._recorders[seq.request_id] = TraceRecorder(
                self._shape.num_moe_layers, self._shape.num_experts, self.lookahead_top)
        recorder.add(counts, looks, num_tokens, prefill)
        if self.feed is not None:
            self.feed.observe(seq.request_id, counts, prefill)

    def next_token(self, seq: Sequence, token: int, logits: torch.Tensor | None) -> None:
        """Take `seq`'s next `token` (chosen from its `logits` `[V]`, given where the request
        asks for log-probabilities), stream it, finish the request if it ended.

        Raises:
            RuntimeError: the request asks for log-probabilities and `logits` is None.
        """
        request = seq.request
        now = time.perf_counter()
        if seq.first_token_s is None:
            seq.first_token_s = now
            self.listener.on_first_token(now - seq.arrival_s)
        elif seq.last_token_s is not None:
            self.listener.on_next_token(now - seq.last_token_s)
        seq.last_token_s = now
        seq.output_ids.append(token)
        logprobs = None
        if request.logprobs is not None:
            if logits is None:
                raise RuntimeError(f"request {seq.request_id} asks for log-probabilities, but "
                                   "its logits were not kept")
            logprobs = (_logprob(logits, token, request.logprobs),)
        reason: FinishReason | None = None
        if token in self._eos and not request.ignore_eos:
            text, reason = seq.text.flush(), "stop"
        else:
            text = seq.text.push(token)
            if seq.text.stopped:
                reason = "stop"
            elif len(seq.output_ids) >= request.max_tokens:
                text, reason = text + seq.text.flush(), "length"
        if reason is None:
            seq.emit(text, (token,), logprobs)
        else:
            self.finish(seq, reason, text, (token,), logprobs)

    def finish(self, seq: Sequence, reason: FinishReason, text: str = "",
               token_ids: tuple[int, ...] = (), logprobs: tuple[TokenLogprob, ...] | None = None,
               error: str | None = None) -> None:
        """End `seq` (once; later calls do nothing): out of the scheduler, its EAM to the trace
        collection, its last event (with `text`, `token_ids`, `logprobs`) to its sink."""
        if seq.is_finished:
            return
        seq.finish_reason = reason
        self.scheduler.remove(seq)
        recorder = self._recorders.pop(seq.request_id, None)
        if recorder is not None:
            try:
                self.keeper.add(recorder.eam.astype("float32"))
            except MoEError as exc:  # a save that failed (disk full): keep serving
                _log.error("saving the trace collection failed: %s", exc)
        if self.feed is not None:
            self.feed.forget(seq.request_id)
        self.listener.on_finished(reason, time.perf_counter() - seq.arrival_s,
                                  seq.num_prompt_tokens, len(seq.output_ids))
        seq.emit(text, token_ids, logprobs, reason, error)


def _eos_ids(served: ServingModel) -> set[int]:
    """The model's end tokens: its generation config's, else its config.json's."""
    value = served.model.generation_defaults.get("eos_token_id")
    if value is None:
        value = served.model.spec.eos_token_ids
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value} if isinstance(value, list | tuple | set) else set()


def _logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """The log-probability of `token` under `logits` `[V]`, and the `top` most likely."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    best = torch.topk(logp, min(top, logp.shape[-1])) if top > 0 else None
    pairs = () if best is None else tuple(
        (int(i), float(v)) for v, i in zip(best.values, best.indices, strict=True))
    return TokenLogprob(token, float(logp[token]), pairs)
