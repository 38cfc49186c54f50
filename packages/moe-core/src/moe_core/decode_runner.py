"""Decode steps that the host launches once: each batch-size bucket's step captured as a CUDA graph
over a `StaticKVCache` and replayed at every later position.

Dimension key: b rows of the batch, B rows of its bucket, T prompt slots, V vocabulary.

Why: at batch 1 a decode step of a MoE model is hundreds of small kernels, and eager PyTorch
spends more time launching them than the GPU spends running them (Qwen3-30B-A3B x 24 layers on
the H200: 29.6 ms per token eager, against a 0.8 ms memory floor). A captured step is one graph
launch. Capture needs a step whose every shape and address is fixed and that never waits for the
host: the static cache keeps its fill level on the device, routing and expert compute stay on the
device (`LocalExperts`' device paths, or an offloaded executor's mapped fetch), and the graph's
inputs and outputs are static buffers the caller fills and reads.

The step is `MoEForCausalLM.forward` itself, one token per row over the cache: the same code the
eager path runs, so the captured step cannot drift from it. Rows past the batch in its bucket are
inactive (their mask is 0), which a padding row already is in the eager path.

On the CPU, or where something in the model cannot be captured (`graph_blockers`), the runner
runs the same step eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

from moe_core.static_kv_cache import StaticKVCache

if TYPE_CHECKING:
    from moe_core.model import MoEForCausalLM

__all__ = ["DEFAULT_BUCKETS", "CaptureContext", "DecodeRunner", "GraphHooks", "graph_blockers"]

DEFAULT_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
"""Batch sizes captured (a batch runs in the smallest bucket that holds it)."""

_log = logging.getLogger("moe_core.decode_runner")


@runtime_checkable
class GraphHooks(Protocol):
    """What an executor with host-side state needs done around captured steps (its device tables
    refreshed before a replay, its bookkeeping of a replay, warm-up runs forgotten)."""

    def before_replay(self) -> None:
        """Called before every replay of a captured step."""
        ...

    def after_replay(self, num_tokens: int) -> None:
        """Called after every replay, with the step's token count (its bucket)."""
        ...

    def before_warmup(self) -> None:
        """Called before the eager warm-up runs that precede a capture."""
        ...

    def after_warmup(self) -> None:
        """Called after those warm-up runs (their effects on counters must not count)."""
        ...


def graph_blockers(model: MoEForCausalLM) -> list[str]:
    """Why `model`'s decode step cannot be captured as a CUDA graph (empty when it can).

    Python callbacks inside the step (routing or mix observers) would run once at capture and
    never again; an executor that reads its routing on the host cannot be captured at all.
    """
    reasons = []
    if model.device.type != "cuda":
        reasons.append(f"the model is on {model.device.type}, not CUDA")
    for layer in model.layers:
        block = layer.moe
        if layer.mix_observer is not None:
            reasons.append(f"layer {layer.index} has a mix observer")
        if block is None:
            continue
        if block.observer is not None:
            reasons.append(f"layer {layer.index} has a routing observer")
        if not getattr(block.executor, "graph_safe", False):
            reasons.append(f"layer {layer.index}'s expert executor "
                           f"({type(block.executor).__name__}) reads its routing on the host")
    return reasons


def bucket_for(batch_size: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> int:
    """The smallest bucket that holds `batch_size` rows (the batch size itself above them)."""
    return next((b for b in sorted(buckets) if b >= batch_size), batch_size)


class _Captured:
    """One bucket's graph and its static outputs."""

    def __init__(self, graph: torch.cuda.CUDAGraph, logits: torch.Tensor,
                 tokens: torch.Tensor) -> None:
        self.graph = graph
        self.logits = logits  # [B, V]
        self.tokens = tokens  # [B] greedy choice


class CaptureContext:
    """What steps captured from one model depend on, and what its expert executors need done
    around them: shared by `DecodeRunner` and other code that captures the model's steps
    (moe-infinity's serving passes).

    Attributes:
        model: The model.
        hooks: The distinct graph hooks of its expert executors.
        token_limit: The most tokens per step every executor can run inside a graph.
    """

    def __init__(self, model: MoEForCausalLM) -> None:
        self.model = model
        self.hooks: list[GraphHooks] = []
        self.token_limit = 0
        self._signature: tuple[int, ...] | None = None

    def changed(self) -> bool:
        """Whether the model's MoE blocks changed since the last call (True the first time):
        another executor installed, an observer or routing override set, a CPU lane dropped. A
        graph replays the kernels and addresses of the step it captured, not the model as it
        is: the caller drops every graph it captured before."""
        signature = _signature(self.model)
        if signature == self._signature:
            return False
        self.hooks = _hooks_of(self.model)
        self.token_limit = _graph_token_limit(self.model)
        self._signature = signature
        return True

    def warm_up(self, run: Callable[[], object], times: int = 2) -> None:
        """Run `run` eagerly `times` times on a side stream before a capture (lazy allocations,
        kernel compilation), between the executors' warm-up hooks."""
        device = self.model.device
        for hooks in self.hooks:
            hooks.before_warmup()
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(times):
                run()
        torch.cuda.current_stream(device).wait_stream(side)
        for hooks in self.hooks:
            hooks.after_warmup()

    def replay(self, graph: torch.cuda.CUDAGraph, num_tokens: int) -> None:
        """Replay `graph` (a step of `num_tokens` tokens) between the executors' hooks."""
        for hooks in self.hooks:
            hooks.before_replay()
        graph.replay()
        for hooks in self.hooks:
            hooks.after_replay(num_tokens)


class DecodeRunner:
    """Prefill into a static cache, then decode one token per row per step, replaying a captured
    graph per bucket where it can.

    Attributes:
        model: The model.
        cache: The static KV cache (rows of the largest bucket needed, `capacity` slots).
        capacity: Slots per row: prompt width plus new tokens must fit.
        use_graphs: Whether steps are captured and replayed (else run eagerly).
        num_slots: Slots written so far (host mirror of the cache's device counter).
    """

    def __init__(self, model: MoEForCausalLM, max_batch: int, capacity: int, *,
                 buckets: Sequence[int] = DEFAULT_BUCKETS, use_graphs: bool = True) -> None:
        if max_batch <= 0 or capacity <= 0:
            raise ValueError(f"max_batch and capacity must be positive, got {max_batch} and "
                             f"{capacity}")
        device = model.device
        self.model = model
        self.buckets = tuple(sorted(buckets))
        self.max_rows = bucket_for(max_batch, self.buckets)
        self.capacity = capacity
        self.use_graphs = use_graphs and device.type == "cuda"
        self.cache = StaticKVCache(self.max_rows, capacity, device)
        self.num_slots = 0
        self._ids = torch.zeros(self.max_rows, 1, dtype=torch.long, device=device)  # [B, 1]
        self._active = torch.zeros(self.max_rows, 1, dtype=torch.long, device=device)  # [B, 1]
        self._graphs: dict[int, _Captured] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self._batch = 0
        self._context = CaptureContext(model)
        self._eager_buckets: set[int] = set()  # buckets whose capture failed
        self._check_model()

    def fits(self, batch_size: int, slots: int) -> bool:
        """Whether a generation of `batch_size` rows needing `slots` slots fits this runner."""
        return bucket_for(batch_size, self.buckets) <= self.max_rows and slots <= self.capacity

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Start a new batch: forget the last one, run the prompts `[b, T]` eagerly into the
        cache, and return each row's last logits `[b, V]`."""
        b, t = input_ids.shape
        if not self.fits(b, t):
            raise ValueError(f"a batch of {b} prompts of {t} slots does not fit this runner "
                             f"({self.max_rows} rows, {self.capacity} slots)")
        self._check_model()
        self.cache.reset()
        self._active.zero_()
        self._batch = b
        self.num_slots = t
        logits = self.model(input_ids, attention_mask=attention_mask,
                            cache=self.cache.rows(b), last_only=True)
        return logits[:, -1]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, active: torch.Tensor) -> tuple[torch.Tensor,
                                                                        torch.Tensor]:
        """Decode one token per row.

        Args:
            tokens: `[b]` each row's newest token (device).
            active: `[b]` bool, False for rows that have finished (their token is not cached
                and their position does not advance).

        Returns:
            `(logits [b, V], greedy [b])`: the next logits and their argmax; views of static
            buffers, valid until the next `step`.
        """
        if self.num_slots >= self.capacity:
            raise ValueError(f"the runner's cache is full ({self.capacity} slots)")
        b = self._batch
        bucket = bucket_for(b, self.buckets)
        self._ids[:b, 0].copy_(tokens)
        self._active[:b, 0].copy_(active)
        self.num_slots += 1
        captured = self._graphs.get(bucket)
        if captured is None and self._capturable(bucket):
            captured = self._capture(bucket)
        if captured is None:
            logits = self._run(bucket)
            return logits[:b], logits[:b].argmax(dim=-1)
        self._context.replay(captured.graph, bucket)
        return captured.logits[:b], captured.tokens[:b]

    # Internals --------------------------------------------------------------------------------

    def _run(self, bucket: int) -> torch.Tensor:
        """The step itself: one token per row of the bucket through the model; logits `[B, V]`."""
        logits = self.model(self._ids[:bucket], attention_mask=self._active[:bucket],
                            cache=self.cache.rows(bucket), last_only=True)
        return logits[:, -1]

    def _check_model(self) -> None:
        """Forget every captured graph if the model's MoE blocks changed since they were
        captured (`CaptureContext.changed`)."""
        if self._context.changed():
            self._graphs.clear()
            self._eager_buckets.clear()

    def _capturable(self, bucket: int) -> bool:
        return (self.use_graphs and bucket <= self.buckets[-1]
                and bucket <= self._context.token_limit and bucket not in self._eager_buckets)

    def _capture(self, bucket: int) -> _Captured | None:
        """Warm the step up eagerly (lazy allocations, kernel compilation), put the cache back
        as it was, then capture it. None (and eager steps from then on) if capture fails."""
        cache = self.cache
        saved = cache.state()
        self._context.warm_up(lambda: self._run(bucket))
        cache.restore(saved)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                logits = self._run(bucket)
                tokens = logits.argmax(dim=-1)
        except RuntimeError as exc:  # an operation that cannot be captured: decode eagerly
            self._eager_buckets.add(bucket)
            cache.restore(saved)
            _log.warning("decode step of bucket %d not captured, running it eagerly: %s",
                         bucket, str(exc).splitlines()[0][:200])
            return None
        captured = self._graphs[bucket] = _Captured(graph, logits, tokens)
        _log.info("captured the decode step of bucket %d", bucket)
        return captured


def _signature(model: MoEForCausalLM) -> tuple[int, ...]:
    """What a captured step depends on beyond its tensors: each MoE block's executor, routing
    override and observer, and what the executor says its captured calls depend on (its
    `capture_key`, e.g. the CPU lane whose semaphores the graph posts), all by identity."""
    return tuple(id(x) for block in model.moe_blocks()
                 for x in (block.executor, block.routing_override, block.observer,
                           getattr(block.executor, "capture_key", None)))


def _graph_token_limit(model: MoEForCausalLM) -> int:
    """The most tokens per step every executor can run inside a graph."""
    limits = [block.executor.graph_token_limit(block.spec.router.top_k)
              for block in model.moe_blocks() if hasattr(block.executor, "graph_token_limit")]
    return min(limits, default=1 << 30)


def _hooks_of(model: MoEForCausalLM) -> list[GraphHooks]:
    """The distinct graph hooks of the model's expert executors."""
    found: dict[int, GraphHooks] = {}
    for block in model.moe_blocks():
        hooks = getattr(block.executor, "graph_hooks", None)
        if hooks is not None:
            found.setdefault(id(hooks), hooks)
    return list(found.values())
