"""Mixtral (Jiang et al. 2024, arXiv:2401.04088): every layer a MoE of 8 experts, softmax top-2,
weights renormalised over the chosen experts."""

from __future__ import annotations

from moe_core.architectures.base import Architecture, CheckpointLayout
from moe_core.architectures.config_parts import common_fields, gqa_attention, rope, spec_errors
from moe_core.hf_config import HFConfig
from moe_core.spec import ModelSpec, MoESpec, RouterSpec

__all__ = ["ARCHITECTURES"]


def spec_from_config(config: HFConfig) -> ModelSpec:
    """Mixtral's spec: `num_local_experts` experts of width `intermediate_size` in every layer."""
    with spec_errors(config):
        attention = gqa_attention(config, sliding_window=config.get("sliding_window"))
        router = RouterSpec("softmax_topk", top_k=config.get_int("num_experts_per_tok"),
                            normalize=True)
        moe = MoESpec(num_experts=config.get_int("num_local_experts", "num_experts"),
                      expert_intermediate_size=config.get_int("intermediate_size"), router=router)
        num_layers = config.get_int("num_hidden_layers")
        sliding = tuple(range(num_layers)) if attention.sliding_window else ()
        return ModelSpec(
            **common_fields(config),
            moe_layers=tuple(range(num_layers)),
            dense_intermediate_size=config.get_int("intermediate_size"),
            attention=attention,
            rope=rope(config, attention.head_dim, default_theta=1e6),  # transformers' default
            moe=moe,
            sliding_layers=sliding,
        )


ARCHITECTURES = (
    Architecture(
        name="MixtralForCausalLM",
        spec_from_config=spec_from_config,
        # Mixtral names its MoE block `block_sparse_moe` and its projections w1 (gate), w3 (up),
        # w2 (down).
        layout=CheckpointLayout(renames=((".mlp.", ".block_sparse_moe."),),
                                expert_projections=("w1", "w3", "w2")),
    ),
)
