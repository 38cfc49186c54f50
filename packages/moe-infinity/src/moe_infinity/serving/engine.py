"""The serving engine: one thread owns the model and runs continuous-batching steps.

Dimension key: b rows of a pass, V vocabulary.

Front ends (the HTTP server's event loop, the terminal chat) call `submit`, `cancel` and
`snapshot` from their own threads; only the engine thread touches the model, the KV pool, the
scheduler, the tracer and the offload runtime. A step (docs/decisions/0008):

1. take new requests and cancellations from the inbox (a cancelled request's KV blocks and batch
   slot are freed now);
2. `Scheduler.plan`: admit what fits, then the decode rows and the prefill chunks;
3. one ragged pass for the decode rows (one token each), one for the prefill chunks; each row's
   routing is traced live;
4. sample each row that has a next token, stream its text, finish what ended (EOS, stop string,
   token limit) and hand its EAM to the trace collection; refresh the activation-aware policy;
5. publish a snapshot for /metrics and /health.

At batch 1 a replayed decode step's host work adds to the time per token (issue 16: the stream
within 10% of in-process decode), so each part of it is kept small and independent of the
output's length: a replay's indices are updated in place for the next token
(`StaticDecodePass.fill`), an eager decode pass takes its slots from each table's kept ones
(`DecodePasses`), text is decoded a few tokens at a time (`TextStream`), and the activation
feed hands a step's routing to a predictor in one update. `benchmarks/engine_host_time.py`
times each phase.

The host work of step n is not moved after the launch of step n+1's replay, though it could
overlap the GPU there: a stop string is found only by detokenising, so step n+1 could run for a
request that already ended (its routing counted in the offload statistics); and the feed's
policy update must reach the cache before the replay's `before_replay` hook, where a prefetcher
(the activation prefetcher's `between_steps`) evicts by that policy. Either would change what is
served or measured.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections import deque
from contextlib import AbstractContextManager, nullcontext

import torch
from moe_core import MoEError, OffloadStats, RequestError, sample_next

from moe_infinity.errors import MoEInfinityError
from moe_infinity.policies import ActivationAwarePolicy
from moe_infinity.serving.activation_feed import ActivationFeed
from moe_infinity.serving.block_allocator import BlockAllocator
from moe_infinity.serving.captured_decode import CapturedDecode, captured_decode_blocker
from moe_infinity.serving.decode_passes import DecodePasses
from moe_infinity.serving.engine_config import EngineConfig
from moe_infinity.serving.engine_listener import EngineListener, NullListener
from moe_infinity.serving.engine_snapshot import EngineSnapshot
from moe_infinity.serving.followers import PassFollowers
from moe_infinity.serving.kv_pool import KVPool
from moe_infinity.serving.live_tracer import LiveTracer
from moe_infinity.serving.ragged_pass import PassRow, RaggedPass
from moe_infinity.serving.request import FinishReason, GenerationRequest, TokenLogprob
from moe_infinity.serving.scheduler import Scheduler
from moe_infinity.serving.sequence import EventSink, Sequence
from moe_infinity.serving.serving_model import ServingModel
from moe_infinity.serving.step_pass import run_pass
from moe_infinity.serving.trace_keeper import TraceKeeper
from moe_infinity.serving.trace_recorder import TraceRecorder

__all__ = ["Engine", "QueueFullError", "ShuttingDownError"]

_log = logging.getLogger("moe_infinity.engine")
_IDLE_WAIT_S = 0.5
_OFFLOAD_EVERY_S = 0.25
"""Most seconds the published offload counters lag while requests run (`_publish`)."""


class QueueFullError(MoEInfinityError):
    """The queue holds `max_queue` requests already (HTTP 429)."""


class ShuttingDownError(MoEInfinityError):
    """The engine no longer accepts requests (HTTP 503)."""


class Engine:
    """Continuous batching over one offloaded model.

    Attributes:
        served: The model, tokenizer and offload runtime.
        config: Batching and queue limits.
        keeper: The trace collection.
        listener: Told of first tokens, later tokens and finished requests (set it before
            `start`).
        followers: The other ranks of an expert-parallel server, which run every pass with
            this engine (`rank_leader`); None: one process.

    `routing`, where given, replaces the model's routers while the engine thread runs
    (benchmarks on dummy weights: `ExpertSettings.routing_context`).
    """

    def __init__(self, served: ServingModel, config: EngineConfig, keeper: TraceKeeper,
                 listener: EngineListener | None = None,
                 routing: AbstractContextManager[None] | None = None,
                 followers: PassFollowers | None = None) -> None:
        self.served = served
        # Benchmark routing (`moe_core.routing_for`): entered by the engine thread for its life.
        self._routing = routing if routing is not None else nullcontext()
        self.config = config
        self.keeper = keeper
        self.listener: EngineListener = listener or NullListener()
        self.followers = followers
        model = served.model
        blocks = KVPool.blocks_for_budget(model.spec, config.kv_bytes, config.block_tokens,
                                          model.dtype)
        self.pool = KVPool(model.spec, blocks, config.block_tokens, model.dtype, model.device)
        self._decode_passes = DecodePasses(self.pool)  # eager decode passes' kept slots
        self.scheduler = Scheduler(BlockAllocator(blocks, config.block_tokens),
                                   config.max_batch, config.prefill_chunk)
        policy = served.policy
        self._feed = (ActivationFeed(policy, keeper.collection)
                      if isinstance(policy, ActivationAwarePolicy) else None)
        self._eos = _eos_ids(served)
        self._recorders: dict[str, TraceRecorder] = {}
        self._cond = threading.Condition()
        self._inbox: deque[Sequence] = deque()
        self._cancels: set[str] = set()
        self._queued = 0  # submitted and not yet admitted or dropped
        self._accepting = True
        self._stopping = False
        self._cancel_everything = False
        self._steps = 0
        self._captured: CapturedDecode | None = None  # made by the engine thread
        self._snapshot = EngineSnapshot()
        self._offload: OffloadStats | None = None
        self._offload_at = 0.0
        self._resident = 0
        self._publish()  # the runtime's counters from the start, before any step
        self._thread = threading.Thread(target=self._run, name="moe-infinity-engine",
                                        daemon=True)

    # The front ends' side (any thread) ---------------------------------------------------------

    @property
    def context_tokens(self) -> int:
        """The model's context length."""
        return self.served.model.spec.max_position_embeddings

    @property
    def max_request_tokens(self) -> int:
        """Most tokens (prompt plus limit) a request may reserve: the context, or the whole KV
        pool where that is smaller."""
        return min(self.context_tokens, self.scheduler.allocator.capacity_tokens)

    def eager_decode_reason(self) -> str | None:
        """Why decode passes run eagerly here (None: they are replayed from CUDA graphs, a
        shape whose capture fails excepted): `config.graphs` off, expert-parallel ranks, or
        `captured_decode_blocker`."""
        if not self.config.graphs:
            return "--no-graphs"
        if self.followers is not None:
            return "expert-parallel ranks"
        return captured_decode_blocker(self.served.model)

    def start(self) -> None:
        """Start the engine thread."""
        self._thread.start()

    def submit(self, request: GenerationRequest, sink: EventSink) -> None:
        """Queue `request`; its events go to `sink` (called on the engine thread).

        Raises:
            RequestError: the prompt and its token limit exceed the context or the KV pool.
            QueueFullError: `max_queue` requests are waiting already.
            ShuttingDownError: the engine is draining or stopped.
        """
        need = request.num_reserved_tokens
        if need > self.max_request_tokens:
            raise RequestError(
                f"the prompt ({len(request.prompt_ids)} tokens) plus max_tokens "
                f"({request.max_tokens}) is {need} tokens; this server holds at most "
                f"{self.max_request_tokens} per request (model context "
                f"{self.context_tokens})")
        seq = Sequence(request, sink, self.served.decode, self.served.model.device)
        with self._cond:
            if not self._accepting:
                raise ShuttingDownError("the server is shutting down")
            if self._queued >= self.config.max_queue:
                raise QueueFullError(f"the queue is full ({self.config.max_queue} requests "
                                     "waiting)")
            self._queued += 1
            self._inbox.append(seq)
            self._cond.notify()

    def cancel(self, request_id: str) -> None:
        """Cancel a request (done at the engine's next step; unknown ids are ignored)."""
        with self._cond:
            self._cancels.add(request_id)
            self._cond.notify()

    def snapshot(self) -> EngineSnapshot:
        """The state published after the latest step."""
        return self._snapshot

    @property
    def is_alive(self) -> bool:
        """Whether the engine thread runs (and every other rank, with expert parallelism)."""
        return self._thread.is_alive() and (self.followers is None or self.followers.is_alive)

    def stop_accepting(self) -> None:
        """Refuse new requests from now on (they get `ShuttingDownError`); running and queued
        ones carry on."""
        with self._cond:
            self._accepting = False
            self._cond.notify()

    def cancel_all(self) -> None:
        """Cancel every running and queued request at the next step (the end of a shutdown's
        grace period): each gets its last event, with finish reason `cancelled`."""
        with self._cond:
            self._cancel_everything = True
            self._cond.notify()

    def stop(self) -> None:
        """Cancel whatever still runs, stop the thread, save the trace collection."""
        with self._cond:
            self._accepting = False
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join()
        if self.followers is not None:
            self.followers.close()
        self.keeper.save()

    # The engine thread ------------------------------------------------------------------------

    def _run(self) -> None:
        device = self.served.model.device
        if device.type == "cuda":  # the current GPU is per thread (cuda:1, or an EP rank's)
            torch.cuda.set_device(device)
        with self._routing, LiveTracer(self.served.model) as tracer:
            self._captured = self._captured_decode(tracer)
            while True:
                with self._cond:
                    if self._stopping:
                        break
                    if self._cancel_everything:
                        self._cancels.update(s.request_id for s in (
                            *self.scheduler.running, *self.scheduler.waiting, *self._inbox))
                        self._cancel_everything = False
                    if not self._inbox and not self._cancels and self.scheduler.is_idle:
                        self._cond.wait(_IDLE_WAIT_S)
                        continue
                    arrivals = list(self._inbox)
                    self._inbox.clear()
                    cancels = set(self._cancels)
                    self._cancels.clear()
                try:
                    self._step(tracer, arrivals, cancels)
                except Exception:  # a bug: fail the running requests, keep serving
                    _log.error("engine step failed:\n%s", traceback.format_exc())
                    self._fail_all("internal error in the engine step")
                self._publish()
        for seq in [*self.scheduler.running, *self.scheduler.waiting, *self._inbox]:
            self._finish(seq, "cancelled")
        self._publish()

    def _captured_decode(self, tracer: LiveTracer) -> CapturedDecode | None:
        """The captured decode passes, where this engine can replay them, else None."""
        reason = self.eager_decode_reason()
        if reason is None and tracer.chains_other_observers:
            reason = "routing observers other than the tracer's"
        if reason is not None:
            _log.info("decode passes run eagerly: %s", reason)
            return None
        return CapturedDecode(self.served.model, self.pool, tracer)

    def _step(self, tracer: LiveTracer, arrivals: list[Sequence], cancels: set[str]) -> None:
        for seq in arrivals:
            self.scheduler.add(seq)
        if cancels:  # arrivals included: a request cancelled before it was queued
            for seq in [*self.scheduler.running, *self.scheduler.waiting]:
                if seq.request_id in cancels:
                    self._finish(seq, "cancelled")
        plan = self.scheduler.plan()
        with self._cond:
            self._queued = len(self.scheduler.waiting) + len(self._inbox)
        if plan.decode:
            self._pass(tracer, [(s, s.pending_ids()) for s in plan.decode], prefill=False)
        if plan.prefill:
            self._pass(tracer, [(s, s.pending_ids(n)) for s, n in plan.prefill], prefill=True)
        if self._feed is not None:
            self._feed.refresh()
        self._steps += 1

    def _pass(self, tracer: LiveTracer, rows: list[tuple[Sequence, list[int]]],
              prefill: bool) -> None:
        model = self.served.model
        pass_rows = [PassRow(s.table or [], s.num_cached, ids) for s, ids in rows]
        replayed = None
        if not prefill and self._captured is not None:
            replayed = self._captured.run(pass_rows)
        if replayed is not None:
            logits, (counts, looks) = replayed
        else:
            batch = (RaggedPass(pass_rows, self.pool, model.device) if prefill
                     else self._decode_passes.build(pass_rows, model.device))
            tracer.begin_pass(batch.row_of_token, batch.num_rows)
            if self.followers is None:
                logits = run_pass(model, batch, self.pool)  # [b, V]
            else:  # every rank runs the pass (each its own experts), this one samples
                logits = self.followers.run(pass_rows,
                                            lambda: run_pass(model, batch, self.pool))
            counts, looks = tracer.end_pass()
        greedy = logits.argmax(dim=-1).tolist()  # one host read for every greedy row
        for i, (seq, ids) in enumerate(rows):
            seq.num_cached += len(ids)
            recorder = self._recorders.setdefault(seq.request_id, TraceRecorder(
                self.served.shape.num_moe_layers, self.served.shape.num_experts,
                self.config.lookahead_top))
            recorder.add(counts[i], looks[i], len(ids), prefill)
            if self._feed is not None:
                self._feed.observe(seq.request_id, counts[i], prefill)
            if not seq.is_prefilling:
                sampling = seq.request.sampling
                if sampling.is_greedy:
                    self._next_token(seq, greedy[i], logits[i])
                    continue
                try:
                    token = int(sample_next(logits[i : i + 1], sampling, seq.generator)[0])
                except RuntimeError as exc:  # its sampling alone failed: fail it alone
                    _log.error("sampling request %s failed: %s", seq.request_id, exc)
                    self._finish(seq, "cancelled", error=f"sampling failed: {exc}")
                    continue
                self._next_token(seq, token, logits[i])

    def _next_token(self, seq: Sequence, token: int, logits: torch.Tensor) -> None:
        """Take `seq`'s next `token` (sampled from its `logits` `[V]`), stream it, finish the
        request if it ended."""
        request = seq.request
        now = time.perf_counter()
        if seq.first_token_s is None:
            seq.first_token_s = now
            self.listener.on_first_token(now - seq.arrival_s)
        elif seq.last_token_s is not None:
            self.listener.on_next_token(now - seq.last_token_s)
        seq.last_token_s = now
        seq.output_ids.append(token)
        logprobs = None if request.logprobs is None else (
            _logprob(logits, token, request.logprobs),)
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
            self._finish(seq, reason, text, (token,), logprobs)

    def _finish(self, seq: Sequence, reason: FinishReason, text: str = "",
                token_ids: tuple[int, ...] = (), logprobs: tuple[TokenLogprob, ...] | None = None,
                error: str | None = None) -> None:
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
        if self._feed is not None:
            self._feed.forget(seq.request_id)
        self.listener.on_finished(reason, time.perf_counter() - seq.arrival_s,
                                   seq.num_prompt_tokens, len(seq.output_ids))
        seq.emit(text, token_ids, logprobs, reason, error)

    def _fail_all(self, message: str) -> None:
        for seq in [*self.scheduler.running, *self.scheduler.waiting]:
            self._finish(seq, "cancelled", error=message)

    def _publish(self) -> None:
        """Publish the engine's state for the front ends. The scheduler's part is fresh after
        every step; the offload counters (a host read of the device's routing logs and a count
        of every resident expert, about a millisecond) at most every `_OFFLOAD_EVERY_S` while
        requests run, and whenever the engine goes idle."""
        runtime = self.served.runtime
        now = time.perf_counter()
        if (self._offload is None or self.scheduler.is_idle
                or now - self._offload_at >= _OFFLOAD_EVERY_S):
            cache = runtime.cache
            self._offload = runtime.snapshot()
            self._resident = len(cache.table.resident()) if cache is not None else 0
            self._offload_at = now
        allocator = self.scheduler.allocator
        self._snapshot = EngineSnapshot(
            queued=len(self.scheduler.waiting) + len(self._inbox),
            running=len(self.scheduler.running),
            kv_blocks_used=allocator.num_used, kv_blocks_total=allocator.num_blocks,
            steps=self._steps, offload=self._offload, experts_resident=self._resident,
            expert_slots=runtime.pool.num_slots,
            traces_collected=len(self.keeper.collection))


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
