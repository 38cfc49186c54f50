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
from moe_core import MoEForCausalLM

from moe_gen.host_attention import HostAttention
from moe_gen.kv_mover import KVMover
from moe_gen.micro_batch import MicroBatch, MicroBatchKV, SequenceInput
from moe_gen.paged_kv import PagedKV

__all__ = ["BatchEngine", "StepTiming"]


@dataclass
class StepTiming:
    """Where one step's host time went (seconds; device work is synchronised at the end).

    Attributes:
        attention_s: Attention of every micro-batch (incl. KV gathers and write-backs).
        moe_s: MoE and dense MLP blocks.
        total_s: The whole step.
    """

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
                 max_attention_pairs: int = 1 << 62, cpu_attention_share: float = 0.0) -> None:
        if micro_batch_size <= 0 or max_attention_pairs <= 0:
            raise ValueError(f"micro_batch_size and max_attention_pairs must be positive, got "
                             f"{micro_batch_size} and {max_attention_pairs}")
        if not 0.0 <= cpu_attention_share <= 1.0:
            raise ValueError(f"cpu_attention_share must be in [0, 1], got {cpu_attention_share}")
        self.model = model
        self.pages = pages
        self.mover = KVMover(model.device)
        self.micro_batch_size = micro_batch_size
        self.max_attention_pairs = max_attention_pairs
        self.host_attention = (HostAttention(model, pages, cpu_attention_share)
                               if cpu_attention_share > 0 else None)

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

    @torch.no_grad()
    def step(self, seqs: Sequence[SequenceInput], timing: StepTiming | None = None
             ) -> torch.Tensor:
        """Run the new tokens of `seqs` (their `first_row`s packed in order) and cache them.

        Returns:
            Logits `[n, V]` (float32) of each sequence's last new token, in `seqs` order.
        """
        started = time.perf_counter()
        timing = timing if timing is not None else StepTiming()
        model, spec = self.model, self.model.spec
        device = model.device
        ids = torch.tensor([t for s in seqs for t in s.token_ids], device=device)  # [N]
        h = model.model.embed_tokens(ids)  # [N, D]
        host = self.host_attention
        on_host, on_device = host.split(seqs) if host is not None else ([], list(seqs))
        # Device micro-batches first: their kernels run while the host attends its share.
        batches = [(b, False) for b in self._micro_batches(on_device)]
        batches += [(b, True) for b in self._micro_batches(on_host, torch.device("cpu"))]
        masks = [(b.mask(None, h.dtype),
                  b.mask(spec.attention.sliding_window, h.dtype) if spec.sliding_layers else None)
                 for b, _ in batches]
        ropes = [tuple(r.to(b.attention_device) for r in model.rotary(b.positions, h.dtype))
                 for b, _ in batches]
        caches = [MicroBatchKV(b, self.pages, host.mover if on_cpu and host else self.mover)
                  for b, on_cpu in batches]
        for i, layer in enumerate(model.model.layers):
            t0 = time.perf_counter()
            for (batch, on_cpu), (full, window), rope, cache in zip(batches, masks, ropes, caches,
                                                                    strict=True):
                mask = window if i in spec.sliding_layers else full
                x = layer.input_layernorm(h[batch.rows])  # [b, T, D]
                attention = host.modules[i] if on_cpu and host else layer.self_attn
                out = attention(x.to(batch.attention_device), rope, mask, cache)  # [b, T, D]
                rows = batch.real_rows
                # index_copy_ of a sum: index_add_ was 100x slower on the CPU for small rows.
                h.index_copy_(0, rows, h.index_select(0, rows) + out[batch.valid].to(device))
            t1 = time.perf_counter()
            h = h + layer.mlp(layer.post_attention_layernorm(h)[None])[0]  # [N, D]
            timing.attention_s += t1 - t0
            timing.moe_s += time.perf_counter() - t1
        self.mover.flush()
        if host is not None:
            host.mover.flush()
        last = torch.tensor([s.first_row + len(s.token_ids) - 1 for s in seqs], device=device)
        logits = model.lm_head(model.model.norm(h[last])).float()  # [n, V]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timing.total_s += time.perf_counter() - started
        return logits
