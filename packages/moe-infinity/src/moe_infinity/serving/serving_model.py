"""The model a server or chat session runs: loaded once, experts offloaded under the budget.

Dense weights go to the device, routed experts to host memory behind device slots
(`moe_core.load_offloaded`) with the eviction policy `--policy` names.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from moe_core import (
    EvictionPolicy,
    ExpertId,
    ModelSpec,
    MoEForCausalLM,
    OffloadRuntime,
    PrefetcherFactory,
    check_device,
    load_offloaded,
    load_tokenizer,
    resolve_model_path,
    run_dtype,
)

from moe_infinity.model_shape import ModelShape
from moe_infinity.serving.expert_settings import ExpertSettings
from moe_infinity.serving.memory_plan import MemoryPlan, plan_memory
from moe_infinity.serving.runtime_policy import ServePolicy, eviction_policy

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["ServingModel", "load_serving_model"]


@dataclass
class ServingModel:
    """What the engine runs.

    Attributes:
        name: The model as the user named it.
        model: The model, its MoE blocks running through `runtime`.
        tokenizer: Its tokenizer (and chat template).
        runtime: The offload runtime (hits, misses, bytes, slots).
        policy: The runtime's eviction policy.
        shape: The routed-expert shape (traces and the collection).
        memory: How the budget was split.
    """

    name: str
    model: MoEForCausalLM
    tokenizer: PreTrainedTokenizerBase
    runtime: OffloadRuntime
    policy: EvictionPolicy
    shape: ModelShape
    memory: MemoryPlan

    def decode(self, token_ids: list[int]) -> str:
        """The text of `token_ids`, special tokens skipped."""
        return str(self.tokenizer.decode(token_ids, skip_special_tokens=True))


def load_serving_model(name: str, device: str, budget_bytes: int, policy: ServePolicy, *,
                       max_batch: int, dtype: str | None = None, kv_bytes: int | None = None,
                       prefetcher: PrefetcherFactory | None = None,
                       experts: ExpertSettings | None = None,
                       shard: Collection[ExpertId] | None = None) -> ServingModel:
    """Check the device and the budget, then load `name` offloaded (with `prefetcher`'s
    prefetches, e.g. moe-core's lookahead, where given; `experts` says how: dummy weights,
    truncation, FP8 experts, the fetch path, the prefill's misses; holding only `shard`, an
    expert-parallel rank's experts, where given).

    Raises:
        DeviceError, SettingError, ConfigError, CheckpointError: as the checks and
            `load_offloaded` raise them, before or while loading.
    """
    experts = experts or ExpertSettings()
    check_device(device)
    folder = resolve_model_path(name, weights=False)
    spec = experts.spec_of(ModelSpec.from_pretrained(folder))
    tokenizer = load_tokenizer(folder, spec.vocab_size if experts.dummy else None)
    torch_dtype = run_dtype(dtype, torch.device(device), spec.torch_dtype)
    # The expert bytes are a byte budget: the slot count comes from the store's layout (FP8
    # blocks are about half the size), so the plan does not depend on the experts' dtype.
    memory = plan_memory(spec, torch_dtype, budget_bytes, max_batch, kv_bytes)
    shape = ModelShape.from_spec(name, spec)
    chosen = eviction_policy(policy, shape)
    loaded = load_offloaded(name, device, memory.expert_bytes, dtype=torch_dtype, policy=chosen,
                            prefetcher=prefetcher, dummy=experts.dummy,
                            num_layers=experts.num_layers, fetch=experts.fetch,
                            two_lanes=experts.lanes == 2, experts=shard,
                            expert_dtype=experts.expert_dtype, prefill=experts.prefill)
    return ServingModel(name, loaded.model, tokenizer, loaded.runtime, chosen, shape, memory)
