"""The serving engine: one thread owns the model and runs continuous-batching steps.

Dimension key: b rows of a pass, V vocabulary.

Front ends (the HTTP server's event loop, the terminal chat) call `submit`, `cancel` and
`snapshot` from their own threads; only the engine thread touches the model, the KV pool, the
scheduler, the tracer and the offload runtime. A step (docs/decisions/0008):

1. take new requests and cancellations from the inbox (a cancelled request's KV blocks and batch
   slot are freed now);
2. `Scheduler.plan`: admit what fits, then the decode rows and the prefill chunks;
3. one ragged pass for the decode rows (one token each), one for the prefill chunks
   (`PassLauncher`); each row's routing is traced live;
4. choose each row's next token on the device (`choose_tokens`), read the pass's routing and
   tokens with one copy (`PassReadback`), then the host work (`RowOutputs`): traces, the
   activation feed, each token streamed, what ended (EOS, stop string, token limit) finished
   and its EAM handed to the trace collection; refresh the activation-aware policy;
5. publish a snapshot for /metrics and /health.

Overlapped steps (docs/decisions/0017, issue 16: the stream's time per token within 10% of
in-process decode). Where the next step's decode pass is known before this step's host work
(the same rows one token further: no prompt prefilling, no row at its token limit, no
cancellation pending, no row asking for log-probabilities, one process), it is enqueued at once
on the tokens just chosen on the device (`_launch_ahead`), so the host work runs while the GPU
computes instead of between passes; the next step takes that pass. `EngineConfig.overlap`
turns it off. A request that ends in step n (EOS, stop string) or is cancelled had step n+1's
pass computed for it: its row is dropped (token never emitted, routing never recorded or fed),
so streams, traces and EAMs are the serial engine's, but the experts it was routed to were
fetched and counted in the offload statistics. The activation feed's policy update reaches the
cache one step later. On eager passes the host runs the next pass before streaming the token:
each token streams one pass later, for no gain on the CPU.

Each part of the host work is kept small and independent of the output's length: a replay's
indices are updated in place for the next token (`StaticDecodePass.fill`), an eager decode pass
takes its slots from each table's kept ones (`DecodePasses`), text is decoded a few tokens at a
time (`TextStream`), and the activation feed hands a step's routing to a predictor in one
update. `benchmarks/engine_host_time.py` times each phase and what of it runs ahead.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections import deque
from contextlib import AbstractContextManager, nullcontext

import torch
from moe_core import OffloadStats, RequestError

from moe_infinity.errors import MoEInfinityError
from moe_infinity.policies import ActivationAwarePolicy
from moe_infinity.serving.activation_feed import ActivationFeed
from moe_infinity.serving.block_allocator import BlockAllocator
from moe_infinity.serving.captured_decode import CapturedDecode, captured_decode_blocker
from moe_infinity.serving.engine_config import EngineConfig
from moe_infinity.serving.engine_listener import EngineListener, NullListener
from moe_infinity.serving.engine_snapshot import EngineSnapshot
from moe_infinity.serving.followers import PassFollowers
from moe_infinity.serving.kv_pool import KVPool
from moe_infinity.serving.live_tracer import LiveTracer
from moe_infinity.serving.pass_launcher import LaunchedPass, PassLauncher
from moe_infinity.serving.pass_readback import PassReadback
from moe_infinity.serving.ragged_pass import PassRow
from moe_infinity.serving.request import FinishReason, GenerationRequest
from moe_infinity.serving.row_outputs import RowOutputs
from moe_infinity.serving.scheduler import Scheduler
from moe_infinity.serving.sequence import EventSink, Sequence
from moe_infinity.serving.serving_model import ServingModel
from moe_infinity.serving.token_choice import choose_tokens
from moe_infinity.serving.trace_keeper import TraceKeeper

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
        self.followers = followers
        model = served.model
        blocks = KVPool.blocks_for_budget(model.spec, config.kv_bytes, config.block_tokens,
                                          model.dtype)
        self.pool = KVPool(model.spec, blocks, config.block_tokens, model.dtype, model.device)
        self.scheduler = Scheduler(BlockAllocator(blocks, config.block_tokens),
                                   config.max_batch, config.prefill_chunk)
        policy = served.policy
        self._feed = (ActivationFeed(policy, keeper.collection)
                      if isinstance(policy, ActivationAwarePolicy) else None)
        self._outputs = RowOutputs(served, self.scheduler, keeper, self._feed,
                                   listener or NullListener(), config.lookahead_top)
        self._cond = threading.Condition()
        self._inbox: deque[Sequence] = deque()
        self._cancels: set[str] = set()
        self._queued = 0  # submitted and not yet admitted or dropped
        self._accepting = True
        self._stopping = False
        self._cancel_everything = False
        self._steps = 0
        self._captured: CapturedDecode | None = None  # made by the engine thread
        self._launcher: PassLauncher | None = None  # likewise
        self._readback = PassReadback(model.device)
        self._ahead: LaunchedPass | None = None  # the next step's decode pass, enqueued ahead
        self._steps_ahead = 0
        self._snapshot = EngineSnapshot()
        self._offload: OffloadStats | None = None
        self._offload_at = 0.0
        self._resident = 0
        self._publish()  # the runtime's counters from the start, before any step
        self._thread = threading.Thread(target=self._run, name="moe-infinity-engine",
                                        daemon=True)

    @property
    def listener(self) -> EngineListener:
        """Told of first tokens, later tokens and finished requests (set it before `start`)."""
        return self._outputs.listener

    @listener.setter
    def listener(self, listener: EngineListener) -> None:
        self._outputs.listener = listener

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
            self._launcher = PassLauncher(self.served.model, self.pool, tracer, self._captured,
                                          self.followers)
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
                    self._step(arrivals, cancels)
                except Exception:  # a bug: fail the running requests, keep serving
                    _log.error("engine step failed:\n%s", traceback.format_exc())
                    self._ahead = None
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

    def _step(self, arrivals: list[Sequence], cancels: set[str]) -> None:
        for seq in arrivals:
            self.scheduler.add(seq)
        if cancels:  # arrivals included: a request cancelled before it was queued
            for seq in [*self.scheduler.running, *self.scheduler.waiting]:
                if seq.request_id in cancels:
                    self._finish(seq, "cancelled")
        plan = self.scheduler.plan()
        with self._cond:
            self._queued = len(self.scheduler.waiting) + len(self._inbox)
        launched, self._ahead = self._ahead, None
        if launched is not None and launched.live_seqs != plan.decode:
            raise RuntimeError("the decode pass enqueued ahead is not this step's decode rows")
        if plan.decode:
            if launched is None:
                launched = self._launch([(s, s.pending_ids()) for s in plan.decode], False)
            self._complete(launched)
        if plan.prefill:
            self._complete(self._launch([(s, s.pending_ids(n)) for s, n in plan.prefill], True))
        if self._feed is not None:
            self._feed.refresh()
        self._steps += 1

    def _launch(self, rows: list[tuple[Sequence, list[int]]], prefill: bool) -> LaunchedPass:
        """Enqueue the pass of `rows` (each sequence with its new tokens); their tokens count
        as cached from now on."""
        assert self._launcher is not None
        seqs = [s for s, _ in rows]
        launched = self._launcher.launch(
            seqs, [PassRow(s.table or [], s.num_cached, ids) for s, ids in rows], prefill)
        for seq, ids in rows:
            seq.num_cached += len(ids)
        return launched

    def _launch_ahead(self, seqs: list[Sequence], tokens: torch.Tensor) -> LaunchedPass:
        """Enqueue the next decode pass of `seqs` on their next `tokens` `[b]`, still on the
        device (the rows' host token ids are placeholders the pass does not read)."""
        assert self._launcher is not None
        rows = [PassRow(s.table or [], s.num_cached, [0]) for s in seqs]
        launched = self._launcher.launch(seqs, rows, False, input_ids=tokens)
        for seq in seqs:
            seq.num_cached += 1
        self._steps_ahead += 1
        return launched

    def _can_run_ahead(self, launched: LaunchedPass) -> bool:
        """Whether the next step's decode pass is known before this step's host work: these
        same rows, one token further (no prompt prefilling, no row ending at its token limit,
        no cancellation pending), every next token chosen on the device (no row asking for
        log-probabilities, which read this pass's logits), on one process."""
        if not self.config.overlap or launched.prefill or self.followers is not None:
            return False
        if self.scheduler.running != launched.seqs:  # a prompt prefills, or a row ended
            return False
        if any(s.request.logprobs is not None or len(s.output_ids) + 1 >= s.request.max_tokens
               for s in launched.seqs):
            return False
        with self._cond:
            return not (self._cancels or self._cancel_everything or self._stopping)

    def _complete(self, launched: LaunchedPass) -> None:
        """Choose the next tokens of `launched` on the device, enqueue the next decode pass on
        them where it is known (`_can_run_ahead`), then read the pass (one wait, for it alone)
        and do its host work: traces, the activation feed, each token streamed or the request
        finished. A row whose request ended after the pass was enqueued (it ran ahead) is
        dropped: its token is never emitted and its routing never recorded."""
        takers: list[Sequence | None] = [
            None if s.is_finished or s.is_prefilling else s for s in launched.seqs]
        choice = choose_tokens(launched.logits, takers)
        self._readback.start((launched.counts, launched.looks, choice.tokens))
        if not choice.errors and self._can_run_ahead(launched):
            self._ahead = self._launch_ahead(launched.seqs, choice.tokens)
        counts, looks, tokens = self._readback.wait()
        # A pass enqueued ahead may be this one's graph again, overwriting its logits.
        logits = launched.logits if self._ahead is None else None
        for i, seq in enumerate(launched.seqs):
            if seq.is_finished:
                continue
            self._outputs.record(seq, counts[i], looks[i], launched.num_tokens[i],
                                 launched.prefill)
            if takers[i] is None:
                continue
            error = choice.errors.get(i)
            if error is not None:
                _log.error("sampling request %s failed: %s", seq.request_id, error)
                self._finish(seq, "cancelled", error=f"sampling failed: {error}")
                continue
            self._outputs.next_token(seq, int(tokens[i]), None if logits is None else logits[i])

    def _finish(self, seq: Sequence, reason: FinishReason, error: str | None = None) -> None:
        self._outputs.finish(seq, reason, error=error)

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
            steps=self._steps, steps_ahead=self._steps_ahead, offload=self._offload,
            experts_resident=self._resident,
            expert_slots=runtime.pool.num_slots,
            traces_collected=len(self.keeper.collection))

