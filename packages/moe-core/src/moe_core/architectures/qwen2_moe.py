"""Qwen2-MoE / Qwen1.5-MoE (Qwen team 2024): fine-grained experts plus one shared expert whose
output is scaled by a sigmoid gate; q/k/v projections with biases."""

from __future__ import annotations

from moe_core.architectures.base import Architecture, CheckpointLayout
from moe_core.architectures.config_parts import common_fields, gqa_attention, rope, spec_errors
from moe_core.hf_config import HFConfig
from moe_core.spec import ModelSpec, MoESpec, RouterSpec

__all__ = ["ARCHITECTURES", "qwen_moe_layers"]


def qwen_moe_layers(config: HFConfig) -> tuple[int, ...]:
    """MoE layers of the Qwen families: every `decoder_sparse_step`-th (1-based), except
    `mlp_only_layers`."""
    num_layers = config.get_int("num_hidden_layers")
    step = config.get_int("decoder_sparse_step", default=1)
    dense = set(config.get("mlp_only_layers", default=[]))
    if config.get_int("num_experts", "num_local_experts") <= 0:
        return ()
    return tuple(i for i in range(num_layers) if i not in dense and (i + 1) % step == 0)


def _sliding_layers(config: HFConfig, num_layers: int) -> tuple[int, ...]:
    """Layers with windowed attention: from `layer_types` when given; otherwise, with
    `use_sliding_window`, the even-indexed layers below `max_window_layers` (transformers 5's rule
    for this family)."""
    if not config.get_bool("use_sliding_window", default=False) or not config.get("sliding_window"):
        return ()
    layer_types = config.get("layer_types")
    if layer_types:
        return tuple(i for i, kind in enumerate(layer_types) if kind == "sliding_attention")
    limit = config.get_int("max_window_layers", default=num_layers)
    return tuple(i for i in range(num_layers) if (i + 1) % 2 != 0 and i < limit)


def spec_from_config(config: HFConfig) -> ModelSpec:
    """Qwen2-MoE's spec."""
    with spec_errors(config):
        num_layers = config.get_int("num_hidden_layers")
        sliding = _sliding_layers(config, num_layers)
        attention = gqa_attention(config, qkv_bias=config.get_bool("qkv_bias", default=True),
                                  sliding_window=config.get("sliding_window") if sliding else None)
        router = RouterSpec("softmax_topk", top_k=config.get_int("num_experts_per_tok"),
                            normalize=config.get_bool("norm_topk_prob", default=False))
        moe = MoESpec(
            num_experts=config.get_int("num_experts", "num_local_experts"),
            expert_intermediate_size=config.get_int("moe_intermediate_size"),
            router=router,
            shared_intermediate_size=config.get_int("shared_expert_intermediate_size", default=0),
            num_shared_experts=1 if config.get("shared_expert_intermediate_size") else 0,
            shared_gate=True,
        )
        return ModelSpec(
            **common_fields(config),
            moe_layers=qwen_moe_layers(config),
            dense_intermediate_size=config.get_int("intermediate_size"),
            attention=attention,
            rope=rope(config, attention.head_dim),
            moe=moe,
            sliding_layers=sliding,
        )


ARCHITECTURES = (
    Architecture(
        name="Qwen2MoeForCausalLM",
        spec_from_config=spec_from_config,
        layout=CheckpointLayout(renames=((".shared_experts.", ".shared_expert."),
                                         (".shared_experts_gate.", ".shared_expert_gate."))),
    ),
)
