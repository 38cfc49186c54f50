"""Running a `RaggedPass` through the model's step interface: embed, each layer's `attend` and
`mix`, logits of each row's last new token.

Dimension key: b rows, T new tokens, n real tokens, D hidden, V vocabulary.

The MLP half runs on the real tokens only (packed `[n, D]`): padding would otherwise be routed
to experts, fetched over PCIe, counted in the offload statistics and traced as if it were a
request's routing.
"""

from __future__ import annotations

import torch
from moe_core import MoEForCausalLM

from moe_infinity.serving.kv_pool import KVPool
from moe_infinity.serving.ragged_pass import PooledKV, RaggedPass

__all__ = ["run_pass"]


@torch.no_grad()
def run_pass(model: MoEForCausalLM, batch: RaggedPass, pool: KVPool) -> torch.Tensor:
    """Logits `[b, V]` (float32) at each row's last new token; the new tokens' keys and values
    are written to `pool`."""
    kv = PooledKV(batch, pool)
    h = model.embed(batch.input_ids)  # [b, T, D]
    inputs = batch.attention_inputs(model, h.dtype)
    for layer in model.layers:
        h = h + layer.attend(h, inputs, kv)
        h = h + batch.put_valid(layer.mix(batch.take_valid(h)), h)  # mix on [n, D]
    last = h[torch.arange(batch.num_rows, device=h.device), batch.last]  # [b, D]
    return model.logits(last).float()
