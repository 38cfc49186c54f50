"""Qwen3-MoE (Qwen team 2025, arXiv:2505.09388): fine-grained experts without a shared expert,
RMSNorm on each head's queries and keys (qk-norm) before rotary."""

from __future__ import annotations

from moe_core.architectures.base import Architecture
from moe_core.architectures.config_parts import common_fields, gqa_attention, rope, spec_errors
from moe_core.architectures.qwen2_moe import qwen_moe_layers
from moe_core.hf_config import HFConfig
from moe_core.spec import ModelSpec, MoESpec, RouterSpec

__all__ = ["ARCHITECTURES"]


def spec_from_config(config: HFConfig) -> ModelSpec:
    """Qwen3-MoE's spec; a sliding window, when enabled, applies to every layer."""
    with spec_errors(config):
        window = config.get("sliding_window")
        if not config.get_bool("use_sliding_window", default=False):
            window = None
        bias = config.get_bool("attention_bias", default=False)
        attention = gqa_attention(config, qkv_bias=bias, o_bias=bias, qk_norm="per_head",
                                  sliding_window=window)
        router = RouterSpec("softmax_topk", top_k=config.get_int("num_experts_per_tok"),
                            normalize=config.get_bool("norm_topk_prob", default=False))
        moe = MoESpec(num_experts=config.get_int("num_experts", "num_local_experts"),
                      expert_intermediate_size=config.get_int("moe_intermediate_size"),
                      router=router)
        num_layers = config.get_int("num_hidden_layers")
        return ModelSpec(
            **common_fields(config),
            moe_layers=qwen_moe_layers(config),
            dense_intermediate_size=config.get_int("intermediate_size"),
            attention=attention,
            rope=rope(config, attention.head_dim),
            moe=moe,
            sliding_layers=tuple(range(num_layers)) if window else (),
        )


ARCHITECTURES = (Architecture(name="Qwen3MoeForCausalLM", spec_from_config=spec_from_config),)
