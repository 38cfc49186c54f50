"""Attention on the host for a planned share of the batch (MoE-Gen's hybrid mode).

A decode sequence's attention reads its whole KV cache for one query; on the host that cache is
already where the CPU can read it, so attending there spares its KV the trip over PCIe (on
Mixtral shapes the KV, not the weights, dominates PCIe at large batches). The host keeps its own
copy of each layer's attention half (`DecoderLayer.attention_on`: norm and projections, a few
hundred MB for Mixtral) and torch's CPU kernels do the work, while the GPU attends the rest of
the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from moe_core import AttentionBranch, MoEForCausalLM

from moe_gen.kv_mover import KVMover
from moe_gen.micro_batch import SequenceInput
from moe_gen.paged_kv import PagedKV

__all__ = ["HostAttention"]


class HostAttention:
    """Host copies of the attention modules and the rule that picks the host's sequences.

    Attributes:
        share: Share of the step's decode sequences attended on the host.
        modules: Layer -> its attention half (norm and attention) on the CPU.
        mover: The host's KV reads and writes (no device copies).
    """

    def __init__(self, model: MoEForCausalLM, pages: PagedKV, share: float) -> None:
        del pages  # the host reads the arenas through its mover, like the device does
        self.share = share
        cpu = torch.device("cpu")
        self.modules: list[AttentionBranch] = [layer.attention_on(cpu) for layer in model.layers]
        self.mover = KVMover(cpu)

    def split(self, seqs: Sequence[SequenceInput]
              ) -> tuple[list[SequenceInput], list[SequenceInput]]:
        """`(host, device)` sequences: the host takes `share` of the decode sequences, the
        longest contexts first (they save the most PCIe bytes); prompts stay on the device."""
        decodes = sorted((s for s in seqs if len(s.token_ids) == 1),
                         key=lambda s: -s.num_past)
        count = round(self.share * len(decodes))
        chosen = {id(s) for s in decodes[:count]}
        return ([s for s in seqs if id(s) in chosen], [s for s in seqs if id(s) not in chosen])
