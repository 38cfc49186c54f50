"""Attention on the host for a planned share of the batch (MoE-Gen's hybrid mode).

A decode sequence's attention reads its whole KV cache for one query; on the host that cache is
already where the CPU can read it, so attending there spares its KV the trip over PCIe (on
Mixtral shapes the KV, not the weights, dominates PCIe at large batches). The host keeps its own
copy of each layer's attention half (`DecoderLayer.attention_on`: norm and projections, a few
hundred MB for Mixtral) while the GPU attends the rest of the batch.

The attention itself runs one of two ways, chosen by the profile's measurement (`profile.py`):
- `"torch"`: the modules' own path: the past gathered from the pages, joined with the new key,
  repeated per head and attended by torch's CPU kernels;
- `"numba"`: the pages read in place by `paged_attention.NumbaPagedAttention`, through the
  `DecodeAttentionStore` seam of moe-core's attention layers (`HostDecodeKV`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from moe_core import AttentionBranch, MoEForCausalLM

from moe_gen.kv_mover import KVMover
from moe_gen.micro_batch import MicroBatch, MicroBatchKV, SequenceInput
from moe_gen.paged_attention import NumbaPagedAttention, PagedAttentionKernel
from moe_gen.paged_kv import PagedKV

__all__ = ["HOST_ATTENTION_KERNELS", "HostAttention", "HostDecodeKV", "host_attention_kernel"]

HOST_ATTENTION_KERNELS = ("torch", "numba")


def host_attention_kernel(name: str) -> PagedAttentionKernel | None:
    """The paged kernel called `name`, or None for the modules' own torch path.

    Raises:
        ValueError: an unknown name.
    """
    if name == "torch":
        return None
    if name == "numba":
        return NumbaPagedAttention()
    raise ValueError(f"unknown host attention kernel {name!r} (one of "
                     f"{', '.join(HOST_ATTENTION_KERNELS)})")


class HostDecodeKV(MicroBatchKV):
    """A host micro-batch's cache that attends its decode tokens over the pages in place."""

    def __init__(self, batch: MicroBatch, pages: PagedKV, mover: KVMover,
                 kernel: PagedAttentionKernel) -> None:
        super().__init__(batch, pages, mover)
        self.kernel = kernel

    def attend_decode(self, layer: int, queries: tuple[torch.Tensor, ...],
                      new: tuple[torch.Tensor, ...], value_index: int, mask: torch.Tensor,
                      scale: float) -> torch.Tensor:
        """See `moe_core.DecodeAttentionStore`: the new entries are queued for the pages (as
        `append` does) and attended from where they are, with the past."""
        batch = self.batch
        b, _ = batch.shape
        arenas = self.pages.arenas[layer]
        for arena, fresh in zip(arenas, new, strict=True):
            self.mover.scatter(arena, batch.new_slots, batch.take_valid(fresh))
        grouped = [a if a.dim() == 3 else a[:, None] for a in arenas]  # [N, G, E]
        entries = [n.reshape(b, *g.shape[1:]) for n, g in zip(new, grouped, strict=True)]
        slots = batch.past_slots.view(b, batch.num_past)  # [b, P]
        return self.kernel(queries, grouped, entries, value_index, slots, batch.past_lengths,
                           mask, scale)


class HostAttention:
    """Host copies of the attention modules and the rule that picks the host's sequences.

    Attributes:
        share: Share of the step's decode sequences attended on the host.
        modules: Layer -> its attention half (norm and attention) on the CPU.
        mover: The host's KV reads and writes (no device copies).
        kernel: The paged kernel that attends in place, or None for torch's path.
    """

    def __init__(self, model: MoEForCausalLM, pages: PagedKV, share: float,
                 kernel: str = "torch") -> None:
        """Raises:
            ValueError: an unknown `kernel`."""
        del pages  # the host reads the arenas through its mover, like the device does
        self.share = share
        self.kernel = host_attention_kernel(kernel)
        cpu = torch.device("cpu")
        self.modules: list[AttentionBranch] = [layer.attention_on(cpu) for layer in model.layers]
        self.mover = KVMover(cpu)

    def cache(self, batch: MicroBatch, pages: PagedKV) -> MicroBatchKV:
        """The cache a host micro-batch's attention writes through."""
        if self.kernel is None:
            return MicroBatchKV(batch, pages, self.mover)
        return HostDecodeKV(batch, pages, self.mover, self.kernel)

    def split(self, seqs: Sequence[SequenceInput]
              ) -> tuple[list[SequenceInput], list[SequenceInput]]:
        """`(host, device)` sequences: the host takes `share` of the decode sequences, the
        longest contexts first (they save the most PCIe bytes); prompts stay on the device."""
        decodes = sorted((s for s in seqs if len(s.token_ids) == 1),
                         key=lambda s: -s.num_past)
        count = round(self.share * len(decodes))
        chosen = {id(s) for s in decodes[:count]}
        return ([s for s in seqs if id(s) in chosen], [s for s in seqs if id(s) not in chosen])
