"""OLMoE (Muennighoff et al. 2024, arXiv:2409.02060): 64 experts top-8 in every layer, RMSNorm
over the whole query and key projections, optional clipping of q, k and v."""

from __future__ import annotations

from moe_core.architectures.base import Architecture
from moe_core.architectures.config_parts import common_fields, gqa_attention, rope, spec_errors
from moe_core.hf_config import HFConfig
from moe_core.spec import ModelSpec, MoESpec, RouterSpec

__all__ = ["ARCHITECTURES"]


def spec_from_config(config: HFConfig) -> ModelSpec:
    """OLMoE's spec: `intermediate_size` is the width of each expert."""
    with spec_errors(config):
        bias = config.get_bool("attention_bias", default=False)
        clip = config.get("clip_qkv")
        attention = gqa_attention(config, qkv_bias=bias, o_bias=bias, qk_norm="full",
                                  clip_qkv=float(clip) if clip is not None else None)
        router = RouterSpec("softmax_topk", top_k=config.get_int("num_experts_per_tok"),
                            normalize=config.get_bool("norm_topk_prob", default=False))
        moe = MoESpec(num_experts=config.get_int("num_experts", "num_local_experts"),
                      expert_intermediate_size=config.get_int("intermediate_size"), router=router)
        return ModelSpec(
            **common_fields(config),
            moe_layers=tuple(range(config.get_int("num_hidden_layers"))),
            dense_intermediate_size=config.get_int("intermediate_size"),
            attention=attention,
            rope=rope(config, attention.head_dim),
            moe=moe,
        )


ARCHITECTURES = (Architecture(name="OlmoeForCausalLM", spec_from_config=spec_from_config),)
