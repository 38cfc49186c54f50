"""Module-based batching (MoE-Gen, arXiv:2503.09716): one step carries every running sequence
through the model a module at a time.

Dimension key: N new tokens of the step (all sequences, packed, no padding), D hidden, V
vocabulary, n sequences in the step.

Per decoder layer, attention runs micro-batch by micro-batch (each gathers its sequences' past
keys from host pages in one batched copy per cached tensor), then the layer's MoE block runs
once on all N tokens: through moe-core's streaming executor, each needed expert crosses PCIe
once per step and does one large matrix product on all its tokens while the next one copies.
A step can mix prefills (a whole prompt per sequence) with decodes (one token each), which is how
finished slots are refilled from the queue without draining the batch.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from moe_core import AttentionInputs, MoEForCausalLM, mapped_rows_unsupported

from moe_gen.host_attention import HostAttention
from moe_gen.kv_mover import KVMover
from moe_gen.mapped_kv_mover import MappedKVMover
from moe_gen.micro_batch import MicroBatch, MicroBatchKV, SequenceInput
from moe_gen.paged_kv import PagedKV

__all__ = ["BatchEngine", "StepTiming"]


@dataclass
class StepTiming:
    """Where one step's host time went (seconds; device work is synchronised at the end).

    Attributes:
        prepare_s: Building the micro-batches (indices, masks, rotary tables).
        attention_s: Attention of every micro-batch (incl. KV gathers and write-backs).
        moe_s: MoE and dense MLP blocks.
        total_s: The whole step.
    """

    prepare_s: float = 0.0
    attention_s: float = 0.0
    moe_s: float = 0.0
    total_s: float = 0.0


class BatchEngine:
    """Runs steps of the model over host-paged KV.

    Attributes:
        model: The model (dense weights on the compute device; experts offloaded or local).
        pages: The host KV pages.
        mover: The KV copy seam.
        micro_batch_size: Sequences per attention micro-batch.
    """

    def __init__(self, model: MoEForCausalLM, pages: PagedKV, micro_batch_size: int,
                 max_attention_pairs: int = 1 << 62, cpu_attention_share: float = 0.0,
                 kv_lookahead: int = 2, host_attention_kernel: str = "torch",
                 kv_gather: str = "auto") -> None:
        """`kv_lookahead` micro-batches' KV may be gathered before their attention runs (their
        copies overlap earlier work; each holds device memory until attended);
        `host_attention_kernel` attends the host's share (`host_attention.HOST_ATTENTION_KERNELS`);
        `kv_gather` says who gathers the past KV: `"staged"` (a host thread, then one copy:
        `KVMover`), `"mapped"` (the device reads the pinned pages itself: `MappedKVMover`), or
        `"auto"` (mapped where the device can read the pages, else staged).

        Raises:
            ValueError: a non-positive size, a share outside [0, 1], an unknown `kv_gather`, or
                `"mapped"` where the device cannot read the pages.
        """
        if micro_batch_size <= 0 or max_attention_pairs <= 0 or kv_lookahead <= 0:
            raise ValueError(f"micro_batch_size, max_attention_pairs and kv_lookahead must be "
                             f"positive, got {micro_batch_size}, {max_attention_pairs} and "
                             f"{kv_lookahead}")
        if not 0.0 <= cpu_attention_share <= 1.0:
            raise ValueError(f"cpu_attention_share must be in [0, 1], got {cpu_attention_share}")
        self.model = model
        self.pages = pages
        entries = len(model.spec.attention.kv_token_shapes())
        self.mover = _kv_mover(kv_gather, pages, model.device, kv_lookahead * entries)
        self.micro_batch_size = micro_batch_size
        self.max_attention_pairs = max_attention_pairs
        self.host_attention = (HostAttention(model, pages, cpu_attention_share,
                                             host_attention_kernel)
                               if cpu_attention_share > 0 else None)

    @property
    def host_share(self) -> float:
        """Share of each step's decode sequences the host attends now."""
        return self.host_attention.share if self.host_attention is not None else 0.0

    def set_host_share(self, share: float) -> None:
        """Attend `share` of the coming steps' decode sequences on the host (0: none). The
        host's attention copies exist only in an engine built with a share above 0.

        Raises:
            ValueError: a share outside [0, 1], or above 0 in an engine built without one.
        """
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"the host share must be in [0, 1], got {share}")
        if self.host_attention is None:
            if share > 0:
                raise ValueError("this engine was built with no host share: it has no host "
                                 "attention to give a share to")
            return
        self.host_attention.share = share

    def _micro_batches(self, seqs: Sequence[SequenceInput],
                       attention_device: torch.device | None = None) -> list[MicroBatch]:
        """Sequences of similar new-token counts share a micro-batch (little padding); a
        micro-batch closes at `micro_batch_size` sequences or `max_attention_pairs` padded
        query-key pairs, whichever comes first (always at least one sequence)."""
        order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i].token_ids), seqs[i].num_past))
        groups: list[list[SequenceInput]] = []
        current: list[SequenceInput] = []
        longest_new = longest_keys = 0
        for i in order:
            seq = seqs[i]
            new, keys = len(seq.token_ids), seq.num_past + len(seq.token_ids)
            pairs = (len(current) + 1) * max(longest_new, new) * max(longest_keys, keys)
            if current and (len(current) == self.micro_batch_size
                            or pairs > self.max_attention_pairs):
                groups.append(current)
                current, longest_new, longest_keys = [], 0, 0
            current.append(seq)
            longest_new, longest_keys = max(longest_new, new), max(longest_keys, keys)
        if current:
            groups.append(current)
        return [MicroBatch(g, self.pages, self.model.device, attention_device) for g in groups]

    def _prepare(self, seqs: Sequence[SequenceInput], dtype: torch.dtype
                 ) -> tuple[list[_Part], list[_Part]]:
        """The step's device and host micro-batches with their masks, rotary tables, caches."""
        model, spec, host = self.model, self.model.spec, self.host_attention
        on_host, on_device = host.split(seqs) if host is not None else ([], list(seqs))
        parts: tuple[list[_Part], list[_Part]] = ([], [])
        for batches, on_cpu, out in ((self._micro_batches(on_device), False, parts[0]),
                                     (self._micro_batches(on_host, torch.device("cpu")), True,
                                      parts[1])):
            for b in batches:
                window = (b.mask(spec.attention.sliding_window, dtype)
                          if spec.sliding_layers else None)
                cos, sin = model.rope(b.positions, dtype)
                rope = (cos.to(b.attention_device), sin.to(b.attention_device))
                cache = (host.cache(b, self.pages) if on_cpu and host is not None
                         else MicroBatchKV(b, self.pages, self.mover))
                out.append(_Part(b, AttentionInputs(rope, b.mask(None, dtype), window), cache))
        return parts

    @torch.no_grad()
    def step(self, seqs: Sequence[SequenceInput], timing: StepTiming | None = None
             ) -> torch.Tensor:
        """Run the new tokens of `seqs` (their `first_row`s packed in order) and cache them.

        Returns:
            Logits `[n, V]` (float32) of each sequence's last new token, in `seqs` order.
        """
        started = time.perf_counter()
        timing = timing if timing is not None else StepTiming()
        model = self.model
        device = model.device
        layers = model.layers
        ids = torch.tensor([t for s in seqs for t in s.token_ids], device=device)  # [N]
        h = model.embed(ids)  # [N, D]
        on_device, on_host = self._prepare(seqs, h.dtype)
        # Every past-KV gather of the step, in the order the attention modules will ask: the
        # mover's worker gathers them on the host ahead of the main thread.
        gathers = [[(arena, part.batch.past_slots) for part in on_device if part.batch.num_past
                    for arena in self.pages.arenas[i]] for i in range(len(layers))]
        self.mover.plan([g for layer in gathers for g in layer])
        timing.prepare_s += time.perf_counter() - started
        for i, layer in enumerate(layers):
            t0 = time.perf_counter()
            # The host's inputs leave first (they need only the previous layer), so the host
            # attends its share while the device attends the rest.
            inputs = [_to_host(h[p.batch.rows]) for p in on_host]
            for part in on_device:
                out = layer.attend(h[part.batch.rows], part.inputs, part.cache)  # [b, T, D]
                _add_rows(h, part.batch, out)
            for part, (x, ready) in zip(on_host, inputs, strict=True):
                if ready is not None:
                    ready.synchronize()
                assert self.host_attention is not None
                out = self.host_attention.modules[i](x, part.inputs, part.cache)
                _add_rows(h, part.batch, out)
            t1 = time.perf_counter()
            if i + 1 < len(gathers):
                # The next layer's KV copies go out now, ahead of this layer's expert copies
                # on the link (one DMA queue serves both): its attention then need not wait
                # for the whole expert stream, and the experts the streaming ring copies
                # ahead of its routing cross the link during that attention instead.
                self.mover.issue_ahead(len(gathers[i + 1]))
            h = h + layer.mix(h)  # [N, D]
            timing.attention_s += t1 - t0
            timing.moe_s += time.perf_counter() - t1
        self.mover.flush()
        if self.host_attention is not None:
            self.host_attention.mover.flush()
        last = torch.tensor([s.first_row + len(s.token_ids) - 1 for s in seqs], device=device)
        logits = model.logits(h[last]).float()  # [n, V]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timing.total_s += time.perf_counter() - started
        return logits


@dataclass(frozen=True)
class _Part:
    """One micro-batch of a step with what its attention needs at every layer."""

    batch: MicroBatch
    inputs: AttentionInputs
    cache: MicroBatchKV


def _kv_mover(kind: str, pages: PagedKV, device: torch.device, ring_size: int) -> KVMover:
    """The KV mover `kind` names (see `BatchEngine`)."""
    if kind not in ("auto", "staged", "mapped"):
        raise ValueError(f"kv_gather must be 'auto', 'staged' or 'mapped', got {kind!r}")
    if kind == "staged" or (kind == "auto" and device.type != "cuda"):
        return KVMover(device, ring_size)
    reason = next((r for arenas in pages.arenas.values() for arena in arenas
                   if (r := mapped_rows_unsupported(arena, device)) is not None), None)
    if reason is None:
        return MappedKVMover(device, ring_size)
    if kind == "mapped":
        raise ValueError(f"kv_gather 'mapped' is not possible here: {reason}")
    return KVMover(device, ring_size)


def _to_host(x: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """`x` on the host (pinned, copied without blocking) and the event that says it landed."""
    if x.device.type != "cuda":
        return x, None
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    host.copy_(x, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready


def _add_rows(h: torch.Tensor, batch: MicroBatch, out: torch.Tensor) -> None:
    """Add a micro-batch's attention output `[b, T, D]` to its rows of `h` `[N, D]`."""
    delta = batch.take_valid(out)  # [n, D]
    if delta.device != h.device:  # a host micro-batch: pinned, so the copy does not block
        delta = delta.pin_memory().to(h.device, non_blocking=True)
    rows = batch.real_rows
    # index_copy_ of a sum: index_add_ was 100x slower on the CPU for small rows.
    h.index_copy_(0, rows, h.index_select(0, rows) + delta)
